//! tracefs: classic tracepoints attach through it, and it is not always mounted at boot.
use std::{io, path::Path};

pub const ROOT: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing unless it (or debugfs's tracing dir) is already there.
pub fn ensure_mounted() -> io::Result<()> {
    let events = Path::new(ROOT).join("events");
    match std::fs::metadata(&events) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        // tracefs is root's, mode 0700: another user reads it only with CAP_DAC_READ_SEARCH.
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
            return Err(io::Error::other(format!(
                "cannot read {}: {err}{}",
                events.display(),
                super::caps::lacking(
                    super::caps::DAC_READ_SEARCH,
                    "reading tracefs as a user other than root"
                )
            )));
        }
        _ => {}
    }
    // mount(2) itself, not mount(8): util-linux's mount refuses users other than root even when
    // they have CAP_SYS_ADMIN.
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in these names");
    let (source, target) = (c("tracefs"), c(ROOT));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    let err = io::Error::last_os_error();
    if rc == 0 && events.is_dir() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "tracefs is not mounted and mounting it at {ROOT} failed ({err}){}; run `mount -t tracefs tracefs {ROOT}` as root and retry",
        super::caps::lacking(super::caps::SYS_ADMIN, "mounting tracefs")
    )))
}

/// One field of a tracepoint's record as its `format` file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// Parses the `field:TYPE NAME[N]; offset:O; size:S; signed:X;` lines of a format file.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().split(';').map(str::trim);
            let decl = parts.next()?.strip_prefix("field:")?;
            let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
            let size = parts.next()?.strip_prefix("size:")?.parse().ok()?;
            let name = decl.rsplit(' ').next()?;
            let name = name.split('[').next()?.to_owned();
            Some(Field { name, offset, size })
        })
        .collect()
}

/// Checks that the running kernel lays out `category:event` as the eBPF program assumes.
pub fn check_layout(
    category: &str,
    event: &str,
    expected: &[(&str, usize, usize)],
) -> Result<(), String> {
    let path = Path::new(ROOT)
        .join("events")
        .join(category)
        .join(event)
        .join("format");
    let text = std::fs::read_to_string(&path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    verify(&parse_format(&text), expected).map_err(|err| format!("{category}:{event}: {err}"))
}

fn verify(fields: &[Field], expected: &[(&str, usize, usize)]) -> Result<(), String> {
    for &(name, offset, size) in expected {
        match fields.iter().find(|f| f.name == name) {
            Some(f) if f.offset == offset && f.size == size => {}
            Some(f) => {
                return Err(format!(
                    "field {name} is at offset {} size {} in this kernel, the program expects {offset}/{size}",
                    f.offset, f.size
                ));
            }
            None => return Err(format!("field {name} is missing in this kernel")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"";

    #[test]
    fn format_fields_parse_with_names_offsets_and_sizes() {
        let fields = parse_format(FORMAT);
        assert_eq!(fields.len(), 3);
        assert_eq!(
            fields[1],
            Field {
                name: "skaddr".into(),
                offset: 8,
                size: 8
            }
        );
        assert_eq!(
            fields[2],
            Field {
                name: "saddr_v6".into(),
                offset: 40,
                size: 16
            }
        );
    }

    #[test]
    fn a_moved_or_missing_field_is_reported_by_name() {
        let fields = parse_format(FORMAT);
        assert!(verify(&fields, &[("skaddr", 8, 8)]).is_ok());
        assert!(
            verify(&fields, &[("skaddr", 16, 8)])
                .unwrap_err()
                .contains("skaddr is at offset 8")
        );
        assert!(
            verify(&fields, &[("daddr", 36, 4)])
                .unwrap_err()
                .contains("daddr is missing")
        );
    }
}
