//! The one way entwine reads an MQTT broker's address: [`BrokerUrl`].
//!
//! Accepted, with or without a trailing `/`:
//!
//! | written | host | port | tls |
//! |---|---|---|---|
//! | `broker` | `broker` | 1883 | no |
//! | `broker:1884` | `broker` | 1884 | no |
//! | `mqtt://broker:1884`, `tcp://broker:1884` | `broker` | 1884 | no |
//! | `[::1]:1883`, `mqtt://[::1]` | `::1` | 1883 | no |
//! | `mqtts://broker` | `broker` | 8883 | yes |
//!
//! Anything else is refused with a [`BrokerUrlError`] that says what was wrong: another scheme
//! (`http://`), a path, credentials, a port that is not 1–65535, an IPv6 address without its
//! brackets, a character a host name cannot hold.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The MQTT port when none is written.
pub const DEFAULT_PORT: u16 = 1883;
/// The MQTT-over-TLS port when none is written after `mqtts://`.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// A broker's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    /// Host name or IP address; an IPv6 address without its brackets (`::1`).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Written as `mqtts://`: the connection is made over TLS (`entwine_mqtt`; every client
    /// of entwine speaks it).
    pub tls: bool,
}

/// Why a broker address was refused. Each message quotes the address as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    /// Nothing was written.
    #[error(
        "the broker URL is empty: expected host[:port], mqtt://host[:port] or tcp://host[:port]"
    )]
    Empty,
    /// A scheme other than `mqtt://`, `tcp://` or `mqtts://`.
    #[error(
        "broker URL {url:?}: unsupported scheme {scheme:?}: expected mqtt://, tcp:// or mqtts://"
    )]
    Scheme {
        /// The address as written.
        url: String,
        /// The scheme, without `://`.
        scheme: String,
    },
    /// No host before the port (`:1883`, `mqtt://`).
    #[error("broker URL {url:?}: no host")]
    NoHost {
        /// The address as written.
        url: String,
    },
    /// The host holds a character no host name or address can.
    #[error("broker URL {url:?}: {host:?} is not a host name or IP address ({reason})")]
    Host {
        /// The address as written.
        url: String,
        /// The host part.
        host: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An IPv6 address written without brackets (`::1:1883`), which makes its port ambiguous.
    #[error("broker URL {url:?}: an IPv6 address must be in brackets, as in [::1]:1883")]
    Ipv6WithoutBrackets {
        /// The address as written.
        url: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("broker URL {url:?}: {port:?} is not a port (1 to 65535)")]
    Port {
        /// The address as written.
        url: String,
        /// The port part, as written.
        port: String,
    },
    /// Something follows `host:port`: a path, a query or credentials.
    #[error("broker URL {url:?}: unexpected {part:?}: a broker URL has only a host and a port")]
    Extra {
        /// The address as written.
        url: String,
        /// What was not expected.
        part: String,
    },
}

impl BrokerUrl {
    /// Parses a broker address (see the [module](self) for what is accepted).
    pub fn parse(url: &str) -> Result<Self, BrokerUrlError> {
        Self::parse_with_default_port(url, None)
    }

    /// As [`BrokerUrl::parse`], with `default_port` when the address names none (instead of
    /// 1883, or 8883 for `mqtts://`): a configuration that keeps the port apart (the seed's
    /// `targetMqttBrokerPort`).
    pub fn parse_with_default_port(
        url: &str,
        default_port: Option<u16>,
    ) -> Result<Self, BrokerUrlError> {
        let written = url;
        let url = url.trim();
        if url.is_empty() {
            return Err(BrokerUrlError::Empty);
        }
        let err_url = || written.to_owned();
        let (tls, rest) = match url.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "mqtt" | "tcp" => (false, rest),
                "mqtts" => (true, rest),
                _ => {
                    return Err(BrokerUrlError::Scheme {
                        url: err_url(),
                        scheme: scheme.to_owned(),
                    })
                }
            },
            None => (false, url),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(at) = rest.find(['/', '?', '#', '@']) {
            return Err(BrokerUrlError::Extra {
                url: err_url(),
                part: rest[at..].to_owned(),
            });
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(BrokerUrlError::Host {
                    url: err_url(),
                    host: rest.to_owned(),
                    reason: "no closing ']'".into(),
                });
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(BrokerUrlError::Host {
                    url: err_url(),
                    host: host.to_owned(),
                    reason: "not an IPv6 address".into(),
                });
            }
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => {
                        return Err(BrokerUrlError::Extra {
                            url: err_url(),
                            part: after.to_owned(),
                        })
                    }
                },
            };
            (host, port)
        } else {
            match rest.matches(':').count() {
                0 => (rest, None),
                1 => {
                    let (host, port) = rest.split_once(':').unwrap_or((rest, ""));
                    (host, Some(port))
                }
                _ => return Err(BrokerUrlError::Ipv6WithoutBrackets { url: err_url() }),
            }
        };
        if host.is_empty() {
            return Err(BrokerUrlError::NoHost { url: err_url() });
        }
        if !host.contains(':') {
            check_host_name(host).map_err(|reason| BrokerUrlError::Host {
                url: err_url(),
                host: host.to_owned(),
                reason,
            })?;
        }
        let port = match port {
            Some(port) => match port.parse::<u16>() {
                Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
                _ => {
                    return Err(BrokerUrlError::Port {
                        url: err_url(),
                        port: port.to_owned(),
                    })
                }
            },
            None => default_port.unwrap_or(if tls { DEFAULT_TLS_PORT } else { DEFAULT_PORT }),
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }

    /// `host:port`, an IPv6 host in brackets (`[::1]:1883`): what [`BrokerUrl::parse`] reads
    /// back to the same address when there is no TLS.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A host name (letters, digits, `-`, `_`, `.`) or an IPv4 address.
fn check_host_name(host: &str) -> Result<(), String> {
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    match host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(c) => Err(format!("{c:?} cannot be in a host name")),
        None if host.len() > 253 => Err("longer than 253 characters".into()),
        None => Ok(()),
    }
}

/// `host:port` as [`BrokerUrl::authority`], after `mqtts://` when it asks for TLS.
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            f.write_str("mqtts://")?;
        }
        f.write_str(&self.authority())
    }
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> (String, u16, bool) {
        let b = BrokerUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        (b.host, b.port, b.tls)
    }

    fn plain(host: &str, port: u16) -> (String, u16, bool) {
        (host.to_owned(), port, false)
    }

    #[test]
    fn every_accepted_form_gives_host_port_and_tls() {
        assert_eq!(ok("broker"), plain("broker", 1883));
        assert_eq!(ok("physical-broker:1883"), plain("physical-broker", 1883));
        assert_eq!(ok("mqtt://127.0.0.1:1884"), plain("127.0.0.1", 1884));
        assert_eq!(
            ok("tcp://broker.svc.cluster.local:1885/"),
            plain("broker.svc.cluster.local", 1885)
        );
        assert_eq!(ok("MQTT://broker"), plain("broker", 1883));
        assert_eq!(ok("  broker:1884\n"), plain("broker", 1884));
        assert_eq!(ok("[::1]:1883"), plain("::1", 1883));
        assert_eq!(ok("mqtt://[::1]"), plain("::1", 1883));
        assert_eq!(ok("mqtts://broker"), ("broker".into(), 8883, true));
        assert_eq!(ok("mqtts://broker:9883"), ("broker".into(), 9883, true));
        assert_eq!(ok("broker:65535"), plain("broker", 65535));
    }

    #[test]
    fn a_default_port_applies_only_when_none_is_written() {
        let parse = |url| {
            BrokerUrl::parse_with_default_port(url, Some(11883))
                .unwrap()
                .port
        };
        assert_eq!(parse("broker"), 11883);
        assert_eq!(parse("mqtts://broker"), 11883);
        assert_eq!(parse("broker:1884"), 1884);
    }

    #[test]
    fn each_refusal_says_what_was_wrong() {
        let err = |url: &str| BrokerUrl::parse(url).unwrap_err();
        assert_eq!(err(""), BrokerUrlError::Empty);
        assert_eq!(err("   "), BrokerUrlError::Empty);
        assert_eq!(
            err("http://broker:1883"),
            BrokerUrlError::Scheme {
                url: "http://broker:1883".into(),
                scheme: "http".into()
            }
        );
        assert_eq!(
            err(":1883"),
            BrokerUrlError::NoHost {
                url: ":1883".into()
            }
        );
        assert_eq!(
            err("mqtt://"),
            BrokerUrlError::NoHost {
                url: "mqtt://".into()
            }
        );
        assert_eq!(
            err("broker:http"),
            BrokerUrlError::Port {
                url: "broker:http".into(),
                port: "http".into()
            }
        );
        assert_eq!(
            err("broker:0"),
            BrokerUrlError::Port {
                url: "broker:0".into(),
                port: "0".into()
            }
        );
        assert_eq!(
            err("broker:65536"),
            BrokerUrlError::Port {
                url: "broker:65536".into(),
                port: "65536".into()
            }
        );
        assert_eq!(
            err("broker:+1883"),
            BrokerUrlError::Port {
                url: "broker:+1883".into(),
                port: "+1883".into()
            }
        );
        assert_eq!(
            err("broker:"),
            BrokerUrlError::Port {
                url: "broker:".into(),
                port: "".into()
            }
        );
        assert_eq!(
            err("::1:1883"),
            BrokerUrlError::Ipv6WithoutBrackets {
                url: "::1:1883".into()
            }
        );
        assert_eq!(
            err("mqtt://broker:1883/topic"),
            BrokerUrlError::Extra {
                url: "mqtt://broker:1883/topic".into(),
                part: "/topic".into()
            }
        );
        assert_eq!(
            err("mqtt://user:pw@broker"),
            BrokerUrlError::Extra {
                url: "mqtt://user:pw@broker".into(),
                part: "@broker".into()
            }
        );
        assert_eq!(
            err("[::1]x"),
            BrokerUrlError::Extra {
                url: "[::1]x".into(),
                part: "x".into()
            }
        );
        assert!(
            matches!(err("[::1"), BrokerUrlError::Host { reason, .. } if reason == "no closing ']'")
        );
        assert!(
            matches!(err("[broker]:1883"), BrokerUrlError::Host { host, .. } if host == "broker")
        );
        assert!(
            matches!(err("bro ker:1883"), BrokerUrlError::Host { reason, .. } if reason == "' ' cannot be in a host name")
        );
    }

    #[test]
    fn messages_quote_the_address_and_name_the_problem() {
        assert_eq!(
            BrokerUrl::parse("broker:http").unwrap_err().to_string(),
            "broker URL \"broker:http\": \"http\" is not a port (1 to 65535)"
        );
        assert_eq!(
            BrokerUrl::parse("http://broker").unwrap_err().to_string(),
            "broker URL \"http://broker\": unsupported scheme \"http\": expected mqtt://, tcp:// or mqtts://"
        );
    }

    #[test]
    fn tls_is_written_back_as_mqtts() {
        let tls = BrokerUrl::parse("mqtts://broker").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.to_string(), "mqtts://broker:8883");
    }

    #[test]
    fn the_authority_reads_back_to_the_same_address() {
        for url in [
            "broker:1884",
            "[::1]:1883",
            "10.0.0.1:1883",
            "mqtts://[2001:db8::1]:8883",
        ] {
            let parsed = BrokerUrl::parse(url).unwrap();
            assert_eq!(parsed.to_string(), url);
            assert_eq!(parsed.to_string().parse::<BrokerUrl>(), Ok(parsed));
        }
        assert_eq!(
            BrokerUrl::parse("::1").unwrap_err(),
            BrokerUrlError::Ipv6WithoutBrackets { url: "::1".into() }
        );
    }
}
