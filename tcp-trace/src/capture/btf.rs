//! Member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`). aya's eBPF side has
//! no CO-RE relocations, so the agent resolves the few offsets the programs need (offsets.rs) and
//! hands them over as one global. Only what that needs is parsed: type records, names,
//! struct/union members.
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF data: {0}")]
    Format(&'static str),
    #[error("struct {0} is not in the kernel's BTF")]
    NoStruct(String),
    #[error("{0} has no member {1}")]
    NoMember(String, String),
}

const MAGIC: u16 = 0xeb9f;

// BTF kinds (include/uapi/linux/btf.h).
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Type {
    kind: u32,
    /// For struct/union members' offsets: whether they encode bitfield sizes.
    kind_flag: bool,
    /// The referenced type for modifiers and typedefs.
    target: u32,
    /// Byte range of the struct/union member array in the type section.
    members: std::ops::Range<usize>,
}

pub struct Btf {
    data: Vec<u8>,
    strings: std::ops::Range<usize>,
    types_start: usize,
    /// Index 0 is `void`.
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

impl Btf {
    pub fn from_sys_fs() -> std::io::Result<Btf> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Btf::parse(data).map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let u16_at = |at: usize| {
            data.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Format(
                "bad magic (only little-endian BTF is read)",
            ));
        }
        let word = |at: usize| word_at(&data, at).ok_or(BtfError::Format("truncated header"));
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let types_start = hdr_len + type_off;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if strings.end > data.len() || types_start + type_len > data.len() {
            return Err(BtfError::Format("sections outside the data"));
        }
        let mut btf = Btf {
            data,
            strings,
            types_start,
            types: Vec::new(),
            structs: HashMap::new(),
        };
        btf.index_types(type_len)?;
        Ok(btf)
    }

    fn index_types(&mut self, type_len: usize) -> Result<(), BtfError> {
        let truncated = BtfError::Format("truncated type");
        self.types.push(Type {
            kind: 0,
            kind_flag: false,
            target: 0,
            members: 0..0,
        });
        let mut at = self.types_start;
        let end = self.types_start + type_len;
        while at < end {
            let word = |off: usize| word_at(&self.data, at + off);
            let (name, info, target) = (word(0), word(4), word(8));
            let (Some(name), Some(info), Some(target)) = (name, info, target) else {
                return Err(truncated);
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
                3 => 12,                   // ARRAY
                4 | 5 => 12 * vlen,        // STRUCT, UNION
                6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
                15 | 19 => 12 * vlen,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, modifiers, FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Format("unknown type kind")),
            };
            let members = at + 12..at + 12 + extra;
            if kind == KIND_STRUCT && name != 0 {
                let id = self.types.len() as u32;
                // The first definition wins; later ones with the same name are rare duplicates.
                self.structs
                    .entry(self.string(name).to_owned())
                    .or_insert(id);
            }
            self.types.push(Type {
                kind,
                kind_flag: info >> 31 == 1,
                target,
                members,
            });
            at += 12 + extra;
        }
        Ok(())
    }

    fn string(&self, offset: u32) -> &str {
        let start = self.strings.start + offset as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }

    /// The byte offset of a member path such as `sock.__sk_common.skc_net.net`: the first
    /// component names a struct, the rest are members (anonymous struct/union members are
    /// searched through, as C does).
    pub fn member_offset(&self, path: &str) -> Result<u32, BtfError> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let mut ty = *self
            .structs
            .get(root)
            .ok_or_else(|| BtfError::NoStruct(root.to_owned()))?;
        let mut offset_bits = 0u32;
        let mut walked = root.to_owned();
        for member in parts {
            let (bits, member_ty) = self
                .find_member(ty, member)
                .ok_or_else(|| BtfError::NoMember(walked.clone(), member.to_owned()))?;
            offset_bits += bits;
            ty = self.resolve(member_ty);
            walked = format!("{walked}.{member}");
        }
        Ok(offset_bits / 8)
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        while let Some(t) = self.types.get(id as usize) {
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.target
                }
                _ => break,
            }
        }
        id
    }

    fn find_member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let t = self.types.get(id as usize)?;
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        for at in t.members.clone().step_by(12) {
            let (m_name, m_type, m_offset) = (
                word_at(&self.data, at)?,
                word_at(&self.data, at + 4)?,
                word_at(&self.data, at + 8)?,
            );
            let bits = if t.kind_flag {
                m_offset & 0x00ff_ffff
            } else {
                m_offset
            };
            if m_name == 0 {
                if let Some((inner, ty)) = self.find_member(self.resolve(m_type), name) {
                    return Some((bits + inner, ty));
                }
            } else if self.string(m_name) == name {
                return Some((bits, m_type));
            }
        }
        None
    }
}

fn word_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: struct outer { int a; union { int b; struct inner c; }; } and
    /// struct inner { int x; int y; }.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0inner\0x\0y\0";
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            (strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
                + 1) as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        push(&[name("int"), 1 << 24, 4, 32]); // 1: int
        push(&[name("inner"), (4 << 24) | 2, 8]); // 2: struct inner
        push(&[name("x"), 1, 0, name("y"), 1, 32]);
        push(&[0, (5 << 24) | 2, 8]); // 3: anonymous union
        push(&[name("b"), 1, 0, name("c"), 2, 0]);
        push(&[name("outer"), (4 << 24) | 2, 12]); // 4: struct outer
        push(&[name("a"), 1, 0, 0, 3, 32]);
        let mut data = Vec::new();
        for word in [
            0x0001_eb9fu32,
            24,
            0,
            types.len() as u32,
            types.len() as u32,
        ] {
            data.extend(word.to_le_bytes());
        }
        data.extend((strings.len() as u32).to_le_bytes());
        data.extend(&types);
        data.extend(strings);
        data
    }

    #[test]
    fn member_paths_add_offsets_through_anonymous_unions() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.member_offset("outer.a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer.b").unwrap(), 4);
        assert_eq!(btf.member_offset("outer.c.y").unwrap(), 8);
        assert_eq!(btf.member_offset("inner.y").unwrap(), 4);
    }

    #[test]
    fn missing_names_say_which_part_is_missing() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(
            btf.member_offset("outer.c.z").unwrap_err().to_string(),
            "outer.c has no member z"
        );
        assert!(matches!(
            btf.member_offset("nope.a"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(Btf::parse(vec![1, 2, 3]).is_err());
    }

    #[test]
    fn running_kernel_btf_has_the_netns_path() {
        let btf = Btf::from_sys_fs().expect("this kernel exposes /sys/kernel/btf/vmlinux");
        let net = btf.member_offset("sock.__sk_common.skc_net.net").unwrap();
        let inum = btf.member_offset("net.ns.inum").unwrap();
        assert!(net > 0 && inum > 0);
    }
}
