//! The agent's TLS files, checked whole before anything is loaded or bound: a bad file stops
//! the agent at once with a sentence naming it, instead of failing inside tonic's server
//! builder once the programs are attached.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem, pem::PemObject},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::ListenError;

/// PEM files for serving TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by one of these (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// One PEM file's bytes, with the flag that named it (for messages).
struct Pem<'a> {
    flag: &'static str,
    path: &'a Path,
    bytes: Vec<u8>,
}

impl<'a> Pem<'a> {
    fn read(flag: &'static str, path: &'a Path) -> Result<Pem<'a>, ListenError> {
        let bytes = std::fs::read(path).map_err(|source| ListenError::TlsFile {
            flag,
            path: path.to_owned(),
            source,
        })?;
        Ok(Pem { flag, path, bytes })
    }

    fn bad(&self, problem: impl Into<String>) -> ListenError {
        ListenError::TlsMaterial {
            flag: self.flag,
            path: self.path.to_owned(),
            problem: problem.into(),
        }
    }

    /// Every certificate in the file, in order; at least one.
    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, ListenError> {
        let certs = CertificateDer::pem_slice_iter(&self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| self.bad(pem_problem(&err)))?;
        if certs.is_empty() {
            return Err(self.bad(
                "it holds no certificate (a PEM block starting -----BEGIN CERTIFICATE-----)",
            ));
        }
        Ok(certs)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, ListenError> {
        PrivateKeyDer::from_pem_slice(&self.bytes).map_err(|err| match err {
            pem::Error::NoItemsFound => self.bad(
                "it holds no private key (a PEM block starting -----BEGIN PRIVATE KEY-----, \
                 RSA PRIVATE KEY or EC PRIVATE KEY)",
            ),
            err => self.bad(pem_problem(&err)),
        })
    }
}

/// The PEM parser's error in an operator's words (its own shows raw bytes).
fn pem_problem(err: &pem::Error) -> String {
    match err {
        pem::Error::MissingSectionEnd { .. } => "a PEM block has no -----END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a -----BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "a PEM block is not valid base64".into(),
        err => format!("it is not valid PEM: {err}"),
    }
}

impl TlsFiles {
    /// Reads the files and checks them as the server will use them: the certificates and the
    /// key parse, the key is the certificate's, and the client CA's certificates are usable
    /// trust anchors. Each problem is reported against its file.
    pub fn server_config(&self) -> Result<ServerTlsConfig, ListenError> {
        let provider = Arc::new(ring::default_provider());
        let cert = Pem::read("--tls-cert", &self.cert)?;
        let key = Pem::read("--tls-key", &self.key)?;
        let chain = cert.certificates()?;
        let key_der = key.private_key()?;
        let signing_key = provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|err| key.bad(format!("the private key cannot be used: {err}")))?;
        match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(ListenError::TlsKeyMismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                });
            }
            Err(err) => return Err(cert.bad(format!("the first certificate is unusable: {err}"))),
        }
        let ca = self
            .client_ca
            .as_deref()
            .map(|path| Pem::read("--tls-client-ca", path))
            .transpose()?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| ListenError::Tls(err.to_string()))?;
        let builder = match &ca {
            Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, &provider)?),
            None => builder.with_no_client_auth(),
        };
        // The same check tonic makes when it builds its acceptor from these bytes.
        builder
            .with_single_cert(chain, key_der)
            .map_err(|err| ListenError::Tls(err.to_string()))?;

        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert.bytes, key.bytes));
        if let Some(ca) = ca {
            // Without client_auth_optional, a client without a certificate from this CA is
            // refused in the handshake.
            config = config.client_ca_root(Certificate::from_pem(ca.bytes));
        }
        Ok(config)
    }
}

/// Checks every CA certificate one by one: tonic keeps the parsable ones and drops the rest
/// silently, which would leave a CA file of garbage looking like a bad key pair.
fn client_verifier(
    ca: &Pem<'_>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, ListenError> {
    let mut roots = RootCertStore::empty();
    for (n, cert) in ca.certificates()?.into_iter().enumerate() {
        roots.add(cert).map_err(|err| {
            ca.bad(format!(
                "certificate {} is not usable as a CA certificate: {err}",
                n + 1
            ))
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|err| ca.bad(format!("it cannot verify client certificates: {err}")))
}
