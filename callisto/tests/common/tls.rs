//! Certificates for tests, made with rcgen: a CA, a server certificate for 127.0.0.1 and
//! localhost, and a client certificate, all signed by the CA.

use std::path::{Path, PathBuf};

pub struct Pki {
    pub ca_pem: String,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub ca_file: PathBuf,
    /// Client certificate and key, PEM, concatenated (reqwest's identity format).
    pub client_identity: Vec<u8>,
    /// The server key's PEM, to check it never reaches logs.
    pub server_key_pem: String,
}

pub fn generate(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "callisto test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();

    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let server = server_params.signed_by(&server_key, &ca).unwrap();

    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(vec!["client.callisto.test".into()]).unwrap();
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca).unwrap();

    let write = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    Pki {
        ca_pem: ca.pem(),
        server_cert: write("server.pem", &server.pem()),
        server_key: write("server.key", &server_key.serialize_pem()),
        ca_file: write("ca.pem", &ca.pem()),
        client_identity: format!("{}{}", client.pem(), client_key.serialize_pem()).into_bytes(),
        server_key_pem: server_key.serialize_pem(),
    }
}
