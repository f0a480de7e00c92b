//! How every MQTT client of entwine connects: the connector, the device emulator, the digital
//! publisher of the functions, the benchmarks.
//!
//! - [`MqttSecurity`]: what a client is configured with — a user name and password, and TLS
//!   (a CA file to verify the broker by, an optional client certificate for mutual TLS).
//! - [`MqttSecurity::prepare`] reads and checks the files once, before any connection, so a
//!   missing file or a key that does not parse is an error naming the file at start, not a
//!   reconnection loop. The [`Prepared`] result is applied to each connection's options.
//! - [`DeviceCredentials`]: one password per device (a file of `device-id:password` lines), so a
//!   fleet's devices each log in as themselves and a broker's ACL can let each write only its
//!   own topics (`pattern write device/%u/#` in Mosquitto).
//! - [`refusal`]: the connection errors that are the broker (or the TLS handshake) refusing this
//!   client, as a sentence saying what to fix, to log and to report.
//!
//! TLS is rustls with the ring provider; certificates are verified by webpki against the CA
//! file, or the system's roots when the broker address says `mqtts://` and no CA file is given.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use secrecy::{ExposeSecret as _, SecretString};

/// A user name and its password.
#[derive(Clone)]
pub struct Credentials {
    /// The MQTT user name.
    pub username: String,
    /// Its password; never printed.
    pub password: SecretString,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// The files of a TLS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates to verify the broker by; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and private key presented to the broker (mutual TLS).
    pub client: Option<ClientCert>,
}

/// A client certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// PEM certificate chain, the client's first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// How a client authenticates and encrypts. The default: anonymous, plain TCP.
#[derive(Debug, Clone, Default)]
pub struct MqttSecurity {
    /// User name and password, sent in CONNECT.
    pub credentials: Option<Credentials>,
    /// TLS, when set.
    pub tls: Option<TlsFiles>,
}

/// Why the security settings cannot be used. Each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum MqttSecurityError {
    /// A file cannot be read.
    #[error("{what} {path}: cannot read it: {source}")]
    Read {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no PEM item of the kind needed.
    #[error("{what} {path}: {reason}")]
    Pem {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificates or key.
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    /// Only one of the client certificate and key is given.
    #[error("mutual TLS needs both mqtt.cert_file and mqtt.key_file; only {given} is set")]
    HalfClientCert {
        /// The one that is set.
        given: &'static str,
    },
    /// A line of a device credentials file is not `device-id:password`.
    #[error("device credentials {path}, line {line}: {reason}")]
    CredentialsLine {
        /// The file.
        path: PathBuf,
        /// Its line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A device has no entry in the device credentials file.
    #[error("device credentials {path}: no password for device {device:?}")]
    NoDeviceCredentials {
        /// The file.
        path: PathBuf,
        /// The device.
        device: String,
    },
}

impl MqttSecurity {
    /// Anonymous, plain TCP.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads and checks the TLS files; `tls_by_address` is whether the broker's address asks
    /// for TLS (`mqtts://`), which turns TLS on with the system's roots when no CA file is set.
    pub fn prepare(&self, tls_by_address: bool) -> Result<Prepared, MqttSecurityError> {
        let tls = match (&self.tls, tls_by_address) {
            (Some(files), _) => Some(client_config(files)?),
            (None, true) => Some(client_config(&TlsFiles::default())?),
            (None, false) => None,
        };
        Ok(Prepared {
            credentials: self.credentials.clone(),
            tls,
        })
    }
}

/// Security settings read and checked, ready for any number of connections.
#[derive(Clone, Default)]
pub struct Prepared {
    credentials: Option<Credentials>,
    tls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("credentials", &self.credentials)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Prepared {
    /// Anonymous, plain TCP.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether connections are made over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The user name connections log in with, if any.
    pub fn username(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.username.as_str())
    }

    /// The same TLS, logging in as `credentials` instead (one device of a fleet).
    pub fn with_credentials(&self, credentials: Credentials) -> Self {
        Self {
            credentials: Some(credentials),
            tls: self.tls.clone(),
        }
    }

    /// Sets the credentials and transport of `options`.
    pub fn apply(&self, options: &mut MqttOptions) {
        if let Some(c) = &self.credentials {
            options.set_credentials(c.username.clone(), c.password.expose_secret().to_owned());
        }
        if let Some(config) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                config.clone(),
            )));
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, MqttSecurityError> {
    std::fs::read(path).map_err(|source| MqttSecurityError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, MqttSecurityError> {
    let pem = read(what, path)?;
    let pem_error = |reason: String| MqttSecurityError::Pem {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(
            "holds no PEM certificate (BEGIN CERTIFICATE)".into(),
        ));
    }
    Ok(certs)
}

fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, MqttSecurityError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for cert in certificates("mqtt.ca_file", path)? {
                roots.add(cert).map_err(|e| MqttSecurityError::Pem {
                    what: "mqtt.ca_file",
                    path: path.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let config = match &files.client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let chain = certificates("mqtt.cert_file", &client.cert_file)?;
            let pem = read("mqtt.key_file", &client.key_file)?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| MqttSecurityError::Pem {
                what: "mqtt.key_file",
                path: client.key_file.clone(),
                reason: format!("holds no PEM private key: {e}"),
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(Arc::new(config))
}

impl TlsFiles {
    /// The TLS files from their three settings; `None` when none is set.
    pub fn from_settings(
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Result<Option<Self>, MqttSecurityError> {
        let client = match (cert_file, key_file) {
            (Some(cert_file), Some(key_file)) => Some(ClientCert {
                cert_file,
                key_file,
            }),
            (Some(_), None) => {
                return Err(MqttSecurityError::HalfClientCert {
                    given: "mqtt.cert_file",
                })
            }
            (None, Some(_)) => {
                return Err(MqttSecurityError::HalfClientCert {
                    given: "mqtt.key_file",
                })
            }
            (None, None) => None,
        };
        if ca_file.is_none() && client.is_none() {
            return Ok(None);
        }
        Ok(Some(Self { ca_file, client }))
    }
}

/// One password per device, read from a file of `device-id:password` lines (blank lines and
/// lines starting with `#` are skipped; the password is everything after the first `:`).
#[derive(Clone)]
pub struct DeviceCredentials {
    path: PathBuf,
    passwords: BTreeMap<String, SecretString>,
}

impl fmt::Debug for DeviceCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCredentials")
            .field("path", &self.path)
            .field("devices", &self.passwords.len())
            .finish()
    }
}

impl DeviceCredentials {
    /// Reads the file.
    pub fn read(path: &Path) -> Result<Self, MqttSecurityError> {
        let text = std::fs::read_to_string(path).map_err(|source| MqttSecurityError::Read {
            what: "mqtt.credentials_file",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses the text of the file at `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, MqttSecurityError> {
        let mut passwords = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let error = |reason: &str| MqttSecurityError::CredentialsLine {
                path: path.to_owned(),
                line: index + 1,
                reason: reason.to_owned(),
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((device, password)) = line.split_once(':') else {
                return Err(error("expected device-id:password"));
            };
            let device = device.trim();
            if device.is_empty() {
                return Err(error("no device id before ':'"));
            }
            if password.is_empty() {
                return Err(error("empty password"));
            }
            if passwords
                .insert(device.to_owned(), SecretString::from(password.to_owned()))
                .is_some()
            {
                return Err(error(&format!("device {device:?} is listed twice")));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            passwords,
        })
    }

    /// The credentials of `device`: its id as user name, and its password.
    pub fn of(&self, device: &str) -> Result<Credentials, MqttSecurityError> {
        let password =
            self.passwords
                .get(device)
                .ok_or_else(|| MqttSecurityError::NoDeviceCredentials {
                    path: self.path.clone(),
                    device: device.to_owned(),
                })?;
        Ok(Credentials {
            username: device.to_owned(),
            password: password.clone(),
        })
    }

    /// How many devices the file lists.
    pub fn len(&self) -> usize {
        self.passwords.len()
    }

    /// Whether the file lists no device.
    pub fn is_empty(&self) -> bool {
        self.passwords.is_empty()
    }
}

/// When `error` is the broker or the TLS handshake refusing this client, what to fix, as a
/// sentence (`user` is the name the client logged in with). `None` for errors of the network
/// (broker down, connection dropped), which a reconnection may cure.
pub fn refusal(error: &ConnectionError, user: Option<&str>) -> Option<String> {
    let who = match user {
        Some(user) => format!("user {user:?}"),
        None => "an anonymous client (no mqtt.username set)".to_owned(),
    };
    match error {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => Some(format!(
            "the broker refused the credentials of {who}: bad user name or password (check mqtt.username and mqtt.password)"
        )),
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => Some(format!(
            "the broker refused {who}: not authorized (set mqtt.username and mqtt.password, or check the broker's password file)"
        )),
        ConnectionError::ConnectionRefused(code) => {
            Some(format!("the broker refused the connection of {who}: {code:?}"))
        }
        ConnectionError::Tls(e) => Some(format!(
            "TLS with the broker failed: {e} (check mqtt.ca_file, and that the broker's certificate names the host in the broker address)"
        )),
        ConnectionError::Io(e)
            if e.get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            Some(format!(
                "TLS with the broker failed: {e} (check mqtt.ca_file, and that the broker's certificate names the host in the broker address)"
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_credentials_parse_and_name_the_bad_line() {
        let path = Path::new("/etc/creds");
        let creds =
            DeviceCredentials::parse(path, "# fleet\ndev-1:s3cr:et\n\ndev-2: two\n").unwrap();
        assert_eq!(creds.len(), 2);
        let one = creds.of("dev-1").unwrap();
        assert_eq!(one.username, "dev-1");
        assert_eq!(one.password.expose_secret(), "s3cr:et");
        assert_eq!(creds.of("dev-2").unwrap().password.expose_secret(), " two");
        assert_eq!(
            creds.of("dev-3").unwrap_err().to_string(),
            "device credentials /etc/creds: no password for device \"dev-3\""
        );
        let err = DeviceCredentials::parse(path, "dev-1:a\nnocolon\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "device credentials /etc/creds, line 2: expected device-id:password"
        );
        let err = DeviceCredentials::parse(path, "dev-1:a\ndev-1:b\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "device credentials /etc/creds, line 2: device \"dev-1\" is listed twice"
        );
        assert!(format!("{creds:?}").contains("devices: 2"));
        assert!(!format!("{one:?}").contains("s3cr"));
    }

    #[test]
    fn a_half_client_certificate_is_refused() {
        let err = TlsFiles::from_settings(None, Some("c.pem".into()), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "mutual TLS needs both mqtt.cert_file and mqtt.key_file; only mqtt.cert_file is set"
        );
        assert_eq!(TlsFiles::from_settings(None, None, None).unwrap(), None);
    }

    #[test]
    fn tls_files_are_checked_before_any_connection() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let security = MqttSecurity {
            credentials: None,
            tls: Some(TlsFiles {
                ca_file: Some(missing.clone()),
                client: None,
            }),
        };
        let err = security.prepare(false).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "mqtt.ca_file {}: cannot read it",
                missing.display()
            )),
            "{err}"
        );
        std::fs::write(&missing, "not pem").unwrap();
        let err = security.prepare(false).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "mqtt.ca_file {}: holds no PEM certificate (BEGIN CERTIFICATE)",
                missing.display()
            )
        );
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&missing, ca.cert.pem()).unwrap();
        let prepared = security.prepare(false).unwrap();
        assert!(prepared.is_tls());
        assert!(!Prepared::none().is_tls());
    }
}
