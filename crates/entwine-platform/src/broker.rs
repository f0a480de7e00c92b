//! The embedded MQTT broker of `entwine up`: rumqttd, on a thread of its own.
//!
//! `rumqttd::Broker::start` blocks and has no stop call, so the broker lives on a dedicated
//! thread until the process exits; everything that talks to it (devices, connector) is stopped
//! before that, so nothing is lost at exit.
//!
//! # Message size
//! Every broker entwine ships refuses messages over [`MAX_MESSAGE_BYTES`]: this one (rumqttd's
//! `max_payload_size`, which despite its name bounds a packet's remaining length: topic, packet
//! id and payload) and the Kubernetes Mosquitto (`message_size_limit`, the payload, in
//! `deploy/k8s/40-mosquitto.yaml`). So the connector, which accepts packets up to 1 MiB, is
//! never handed one it would refuse (and be disconnected for, on every redelivery). rumqttd
//! refuses by closing the publisher's connection; Mosquitto acknowledges and drops the message.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::ExposeSecret as _;
use serde_json::json;

/// The largest message every broker entwine ships accepts: 256 KiB (262,144 bytes). Larger ones
/// are refused by the broker and never reach a subscriber.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Starts the broker on `wanted`, or on a free port of the same address when that one is taken.
/// Returns once it accepts MQTT connections.
///
/// With `security`'s credentials the broker accepts only that user name and password (rumqttd's
/// `connections.auth`; it has no per-topic ACL: whoever logs in may publish and subscribe to
/// anything). With `tls` (its certificate and key) it serves MQTT over TLS only; the readiness
/// probe then verifies it with `security`'s CA file.
pub async fn start(
    wanted: SocketAddr,
    security: &entwine_mqtt::MqttSecurity,
    tls: Option<&entwine_mqtt::ClientCert>,
) -> anyhow::Result<SocketAddr> {
    let login = security.credentials.as_ref();
    // Checked here, with the file named: rumqttd would fail on its own thread, unheard.
    let probe = security
        .prepare(tls.is_some())
        .context("the embedded broker's clients")?;
    if let Some(tls) = tls {
        for (what, path) in [
            ("--mqtt-tls-cert", &tls.cert_file),
            ("--mqtt-tls-key", &tls.key_file),
        ] {
            std::fs::File::open(path)
                .with_context(|| format!("{what} {}: cannot read it", path.display()))?;
        }
    }
    let address = match TcpListener::bind(wanted) {
        Ok(probe) => probe.local_addr().context("probe socket has no address")?,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::info!(%wanted, "MQTT port in use, choosing a free one (set --mqtt-listen to pick one)");
            TcpListener::bind(SocketAddr::new(wanted.ip(), 0))
                .and_then(|probe| probe.local_addr())
                .with_context(|| format!("cannot find a free port on {}", wanted.ip()))?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot listen on {wanted} for MQTT")),
    };
    let mut connections = json!({
        "connection_timeout_ms": 60_000,
        "max_payload_size": MAX_MESSAGE_BYTES,
        "max_inflight_count": 100,
        "dynamic_filters": true,
    });
    if let Some(login) = login {
        connections["auth"] = json!({ login.username.clone(): login.password.expose_secret() });
    }
    let tls = tls.map(|t| {
        json!({
            "certpath": t.cert_file.display().to_string(),
            "keypath": t.key_file.display().to_string(),
        })
    });
    let config: rumqttd::Config = serde_json::from_value(json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 10_010,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104_857_600,
            "max_segment_count": 10,
        },
        "v4": {
            "1": {
                "name": "entwine-v4",
                "listen": address.to_string(),
                "tls": tls,
                "next_connection_delay_ms": 1,
                "connections": connections,
            }
        }
    }))
    .context("embedded broker configuration")?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .context("cannot start the broker thread")?;
    wait_until_ready(address, &probe).await?;
    Ok(address)
}

/// Connects as an MQTT client until the broker answers CONNACK (a bare TCP probe would make it
/// log a broken connection).
async fn wait_until_ready(
    address: SocketAddr,
    probe: &entwine_mqtt::Prepared,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut options =
            rumqttc::MqttOptions::new("entwine-up-probe", address.ip().to_string(), address.port());
        probe.apply(&mut options);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1);
        let answered = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let last = match answered {
            Ok(Ok(())) => {
                let _ = client.try_disconnect();
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return Ok(());
            }
            Ok(Err(e)) => {
                entwine_mqtt::refusal(&e, probe.username()).unwrap_or_else(|| e.to_string())
            }
            Err(_) => "no CONNACK within 1 s".to_owned(),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "the embedded broker did not answer on {address} within 10 s ({last})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
