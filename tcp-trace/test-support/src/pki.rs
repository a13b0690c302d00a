//! Test certificates for the TLS and mutual-TLS tests: a CA, a server and client certificate
//! signed by it, and a client certificate from another CA (rcgen, PEM files).
use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use tcp_trace::{
    api::{Access, TlsFiles},
    client::{ClientTls, ConnectOptions},
};

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate signed by it,
/// and a client certificate from another CA, as PEM files in a directory removed on drop.
pub struct Pki {
    dir: PathBuf,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        // One directory per Pki: tests of one binary run in parallel threads of one process.
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tcp-trace-pki-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).unwrap();
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let leaf = |names: Vec<String>, purpose, issuer: &CertifiedIssuer<'_, KeyPair>| {
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![purpose];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let trusted = ca("tcp-trace test CA");
        let other = ca("some other CA");
        write("ca.pem", trusted.pem());
        let (cert, key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &trusted,
        );
        write("server.pem", cert);
        write("server.key", key);
        let (cert, key) = leaf(
            vec!["client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &trusted,
        );
        write("client.pem", cert);
        write("client.key", key);
        let (cert, key) = leaf(
            vec!["rogue".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other,
        );
        write("rogue.pem", cert);
        write("rogue.key", key);
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn server(&self, mutual: bool) -> Access {
        Access {
            socket_group: None,
            tls: Some(TlsFiles {
                cert: self.path("server.pem"),
                key: self.path("server.key"),
                client_ca: mutual.then(|| self.path("ca.pem")),
            }),
        }
    }

    pub fn client(&self, identity: Option<&str>) -> ConnectOptions {
        ConnectOptions {
            tls: Some(ClientTls {
                ca: Some(self.path("ca.pem")),
                cert: identity.map(|name| self.path(&format!("{name}.pem"))),
                key: identity.map(|name| self.path(&format!("{name}.key"))),
                domain: None,
            }),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
