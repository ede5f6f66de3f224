//! TLS for `wss://` URLs, with rustls (ring).
//!
//! Without [`ClientBuilder::tls`](crate::ClientBuilder::tls) the client trusts the system's
//! root certificates. To trust a private or test CA, build a config with [`config_with_ca_pem`]:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pem = std::fs::read("deploy/tls/ca.pem")?;
//! let client = pushgate_client::Client::builder("wss://push.example.test/ws")
//!     .token("eyJ...")
//!     .tls(pushgate_client::tls::config_with_ca_pem(&pem)?)
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```

use std::sync::{Arc, OnceLock};

pub use rustls;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use crate::Error;

fn config(roots: RootCertStore) -> Result<ClientConfig, Error> {
    // The provider is named here, not taken from the process default, so the client works
    // whichever rustls crypto features other crates in the program turn on.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A config that trusts the system's root certificates (what `wss://` URLs use by default).
pub fn config_with_native_roots() -> Result<ClientConfig, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(Error::Tls(format!(
            "no usable root certificates found on this system ({:?})",
            found.errors
        )));
    }
    config(roots)
}

/// The config of `wss://` URLs without [`ClientBuilder::tls`](crate::ClientBuilder::tls):
/// the system's roots, read once per process (thousands of clients in one process share it).
pub(crate) fn default_config() -> Result<Arc<ClientConfig>, Error> {
    static DEFAULT: OnceLock<Result<Arc<ClientConfig>, Error>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| config_with_native_roots().map(Arc::new))
        .clone()
}

/// A config that trusts exactly the CA certificates in `pem` (one or more PEM
/// `CERTIFICATE` blocks), and not the system's roots.
pub fn config_with_ca_pem(pem: &[u8]) -> Result<ClientConfig, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::Tls(format!("reading CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls("no CERTIFICATE block in the CA PEM".into()));
    }
    config(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_without_certificates_is_an_error() {
        assert!(config_with_ca_pem(b"").is_err());
        assert!(config_with_ca_pem(b"-----BEGIN CERTIFICATE-----\nnot base64\n").is_err());
    }
}
