//! A throwaway public key infrastructure for tests: a certificate authority that issues server
//! and client certificates, and the key pair that kube-apiserver signs `ServiceAccount` tokens
//! with.
//!
//! Every key is ECDSA P-256 and every certificate is valid from 1975 to 4096 (the `rcgen`
//! defaults), so nothing expires during a test run. Nothing here is fit for production use.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A self-signed certificate authority that issues test certificates.
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, both PEM-encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (`CERTIFICATE` block).
    pub cert_pem: String,
    /// The private key (PKCS #8 `PRIVATE KEY` block).
    pub key_pem: String,
}

/// Paths of a certificate and its private key written by [`IssuedCert::write_to`].
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The PEM certificate file.
    pub cert_path: PathBuf,
    /// The PEM private key file, readable only by its owner.
    pub key_path: PathBuf,
}

/// The key pair that kube-apiserver signs `ServiceAccount` tokens with.
///
/// Pass the private key to `--service-account-signing-key-file` (kube-apiserver) and
/// `--service-account-private-key-file` (kube-controller-manager), and the public key to
/// `--service-account-key-file` (kube-apiserver).
#[derive(Clone)]
pub struct ServiceAccountKeys {
    /// The ECDSA P-256 private key (PKCS #8 `PRIVATE KEY` block).
    pub private_key_pem: String,
    /// The public key (`PUBLIC KEY` block, `SubjectPublicKeyInfo`).
    pub public_key_pem: String,
}

/// Paths written by [`ServiceAccountKeys::write_to`].
#[derive(Clone, Debug)]
pub struct ServiceAccountKeyFiles {
    /// The PEM private key file, readable only by its owner.
    pub private_key_path: PathBuf,
    /// The PEM public key file.
    pub public_key_path: PathBuf,
}

impl TestCa {
    /// Generates a new CA key pair and self-signed CA certificate.
    ///
    /// # Errors
    /// Fails if key generation or signing fails.
    pub fn generate() -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("failed to generate the test CA key pair")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "acrpull test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .context("failed to self-sign the test CA certificate")?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Returns the CA certificate in PEM form, for trust stores and `--client-ca-file`.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a TLS server certificate for the given DNS names and IP addresses.
    ///
    /// The first DNS name (or `localhost` if there is none) becomes the common name.
    ///
    /// # Errors
    /// Fails if a DNS name is not a valid IA5 string, or if key generation or signing fails.
    pub fn issue_server(&self, dns_names: &[&str], ips: &[IpAddr]) -> anyhow::Result<IssuedCert> {
        if dns_names.is_empty() && ips.is_empty() {
            bail!("a server certificate needs at least one DNS name or IP address");
        }
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().copied().unwrap_or("localhost"),
        );
        for name in dns_names {
            let ia5 = (*name)
                .try_into()
                .with_context(|| format!("invalid DNS name {name:?} for a server certificate"))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        self.sign(&params, "server")
    }

    /// Issues a TLS client certificate. Kubernetes reads the common name as the user name and
    /// each organization as a group, so `issue_client("admin", &["system:masters"])` makes a
    /// cluster administrator.
    ///
    /// # Errors
    /// Fails if more than one organization is given, or if key generation or signing fails.
    pub fn issue_client(
        &self,
        common_name: &str,
        organizations: &[&str],
    ) -> anyhow::Result<IssuedCert> {
        // NOTE: rcgen 0.14 stores one value per attribute type in a distinguished name, so a
        // certificate can carry at most one organization (one Kubernetes group).
        if organizations.len() > 1 {
            bail!(
                "a test client certificate can carry at most one organization, got \
                 {organizations:?}. Grant the user the other groups' permissions with RBAC \
                 bindings instead"
            );
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(organization) = organizations.first() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *organization);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        self.sign(&params, "client")
    }

    /// Writes the CA certificate to `dir/<stem>.crt` and returns the path.
    ///
    /// # Errors
    /// Fails if the file cannot be written.
    pub fn write_to(&self, dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("{stem}.crt"));
        write_file(&path, &self.cert_pem, 0o644)?;
        Ok(path)
    }

    fn sign(&self, params: &CertificateParams, kind: &str) -> anyhow::Result<IssuedCert> {
        let key = KeyPair::generate()
            .with_context(|| format!("failed to generate a {kind} certificate key pair"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("failed to sign a {kind} certificate with the test CA"))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl IssuedCert {
    /// Writes the certificate to `dir/<stem>.crt` and the key to `dir/<stem>.key` (mode 0600).
    ///
    /// # Errors
    /// Fails if either file cannot be written.
    pub fn write_to(&self, dir: &Path, stem: &str) -> anyhow::Result<CertFiles> {
        let files = CertFiles {
            cert_path: dir.join(format!("{stem}.crt")),
            key_path: dir.join(format!("{stem}.key")),
        };
        write_file(&files.cert_path, &self.cert_pem, 0o644)?;
        write_file(&files.key_path, &self.key_pem, 0o600)?;
        Ok(files)
    }
}

impl ServiceAccountKeys {
    /// Generates a new ECDSA P-256 key pair, which kube-apiserver accepts for signing tokens
    /// (ES256).
    ///
    /// # Errors
    /// Fails if key generation fails.
    pub fn generate() -> anyhow::Result<Self> {
        let key =
            KeyPair::generate().context("failed to generate the ServiceAccount token key pair")?;
        Ok(Self {
            private_key_pem: key.serialize_pem(),
            public_key_pem: key.public_key_pem(),
        })
    }

    /// Writes the keys to `dir/sa.key` (mode 0600) and `dir/sa.pub`.
    ///
    /// # Errors
    /// Fails if either file cannot be written.
    pub fn write_to(&self, dir: &Path) -> anyhow::Result<ServiceAccountKeyFiles> {
        let files = ServiceAccountKeyFiles {
            private_key_path: dir.join("sa.key"),
            public_key_path: dir.join("sa.pub"),
        };
        write_file(&files.private_key_path, &self.private_key_pem, 0o600)?;
        write_file(&files.public_key_path, &self.public_key_pem, 0o644)?;
        Ok(files)
    }
}

/// Writes `contents` to `path`, creating or truncating it with the given Unix mode.
fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("failed to write {}", path.display()))?;
    // `mode` applies only when the file is created, so an existing file is narrowed here.
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("failed to set the mode of {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ca_issues_pem_certificates() {
        let ca = TestCa::generate().unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));

        let server = ca
            .issue_server(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));

        let client = ca.issue_client("admin", &["system:masters"]).unwrap();
        assert!(client.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(client.key_pem, server.key_pem);
    }

    #[test]
    fn server_certificate_needs_a_name() {
        let ca = TestCa::generate().unwrap();
        assert!(ca.issue_server(&[], &[]).is_err());
    }

    #[test]
    fn client_certificate_rejects_two_organizations() {
        let ca = TestCa::generate().unwrap();
        let error = ca
            .issue_client("admin", &["system:masters", "other"])
            .err()
            .unwrap();
        assert!(error.to_string().contains("at most one organization"));
    }

    #[test]
    fn service_account_keys_are_pem() {
        let keys = ServiceAccountKeys::generate().unwrap();
        assert!(
            keys.private_key_pem
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert!(
            keys.public_key_pem
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
    }

    #[test]
    fn write_to_restricts_key_mode() {
        use std::os::unix::fs::PermissionsExt as _;

        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::generate().unwrap();
        let ca_path = ca.write_to(dir.path(), "ca").unwrap();
        assert_eq!(fs::read_to_string(ca_path).unwrap(), ca.cert_pem());

        let files = ca
            .issue_client("admin", &[])
            .unwrap()
            .write_to(dir.path(), "admin")
            .unwrap();
        let mode = fs::metadata(&files.key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let sa_files = ServiceAccountKeys::generate()
            .unwrap()
            .write_to(dir.path())
            .unwrap();
        assert!(sa_files.public_key_path.exists());
        assert!(sa_files.private_key_path.exists());
    }
}
