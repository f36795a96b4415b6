//! TLS for every listener, with rustls: TLS 1.2 minimum, certificate and key from PEM files that
//! are reloaded when they change (a renewed certificate needs no restart), and optional client
//! certificates (mTLS) checked against a CA bundle.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsSettings;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A rustls server configuration from the files `settings` name.
pub fn server_config(settings: &TlsSettings) -> anyhow::Result<Arc<ServerConfig>> {
    let (Some(cert_file), Some(key_file)) = (&settings.cert_file, &settings.key_file) else {
        anyhow::bail!("http.tls needs cert_file and key_file");
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| format!("reading certificates from {}", cert_file.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", cert_file.display());
    // The error names the file, never its content.
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|_| anyhow::anyhow!("{} holds no readable PEM private key", key_file.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("choosing TLS versions")?;
    let builder = match &settings.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_file)
                .with_context(|| format!("reading client CAs from {}", ca_file.display()))?
            {
                roots.add(cert.context("a client CA certificate")?).context("adding a client CA")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).context("the certificate does not match its key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn stamp(settings: &TlsSettings) -> Vec<Option<SystemTime>> {
    let modified = |p: &Option<std::path::PathBuf>| {
        p.as_deref().and_then(|p: &Path| std::fs::metadata(p).ok()).and_then(|m| m.modified().ok())
    };
    vec![modified(&settings.cert_file), modified(&settings.key_file), modified(&settings.client_ca_file)]
}

/// The listener's TLS configuration, swapped for a new one whenever the files change. A change
/// that does not load (a half-written file) keeps the old one and logs why.
pub fn reloading_config(settings: &TlsSettings) -> anyhow::Result<RustlsConfig> {
    let config = RustlsConfig::from_config(server_config(settings)?);
    let (watched, settings) = (config.clone(), settings.clone());
    tokio::spawn(async move {
        let mut seen = stamp(&settings);
        loop {
            tokio::time::sleep(Duration::from_secs(settings.reload_secs.max(1))).await;
            let now = stamp(&settings);
            if now == seen {
                continue;
            }
            match server_config(&settings) {
                Ok(fresh) => {
                    watched.reload_from_config(fresh);
                    seen = now;
                    tracing::info!("tls certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "tls files changed but do not load; keeping the old ones")
                }
            }
        }
    });
    Ok(config)
}
