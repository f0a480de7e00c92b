//! Test support shared by entwine's crates (a dev-dependency only): every test gets its own
//! store, so tests run in parallel against the real PostgreSQL and never see each other's rows.
//!
//! - [`TestStore::postgres`]: a fresh schema in the test database, dropped afterwards.
//! - [`TestStore::sqlite`]: a fresh SQLite file in a temporary directory.
//! - [`TestDatabase::create`]: a fresh PostgreSQL *database*, for processes that are configured
//!   with host, port and database name rather than a URL (the Fission function binaries).
//!
//! The server is `ENTWINE_TEST_DATABASE_URL`, by default
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres` (`scripts/test` makes it reachable).
#![warn(missing_docs)]

use std::str::FromStr;

use entwine_store::{Store, StoreOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

/// The PostgreSQL server tests use.
pub fn postgres_url() -> String {
    std::env::var("ENTWINE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

fn admin_options() -> PgConnectOptions {
    PgConnectOptions::from_str(&postgres_url()).expect("ENTWINE_TEST_DATABASE_URL is a valid URL")
}

async fn admin(sql: &str) {
    let mut conn = admin_options()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot reach test PostgreSQL at {}: {e}", postgres_url()));
    sqlx::raw_sql(sql)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

/// Runs `sql` on the admin connection from a plain thread: usable from `Drop`, inside or outside
/// a runtime.
fn admin_blocking(sql: String) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                if let Ok(mut conn) = admin_options().connect().await {
                    let _ = sqlx::raw_sql(&sql).execute(&mut conn).await;
                    let _ = conn.close().await;
                }
            });
        }
    })
    .join();
}

fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A store of its own for one test.
pub struct TestStore {
    /// The store under test.
    pub store: Store,
    /// How to reach it: a URL for SQLite, connection options for PostgreSQL.
    pub location: Location,
    cleanup: Cleanup,
}

/// Where a test store lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// A schema of the test PostgreSQL database.
    PostgresSchema {
        /// Options that select the schema through `search_path`.
        options: Box<PgConnectOptions>,
        /// The schema's name.
        schema: String,
    },
    /// A SQLite file.
    Sqlite {
        /// `sqlite://…` URL of the file.
        url: String,
    },
}

enum Cleanup {
    Schema(String),
    Dir(#[allow(dead_code)] tempfile::TempDir),
}

impl TestStore {
    /// A fresh, empty (not migrated) schema in the test PostgreSQL database.
    pub async fn postgres_empty() -> Self {
        let schema = unique_name("t");
        admin(&format!("CREATE SCHEMA {schema}")).await;
        let options = admin_options().options([("search_path", schema.as_str())]);
        Self {
            store: Store::postgres(options.clone(), &StoreOptions::default()),
            location: Location::PostgresSchema {
                options: Box::new(options),
                schema: schema.clone(),
            },
            cleanup: Cleanup::Schema(schema),
        }
    }

    /// A fresh, empty (not migrated) SQLite file.
    pub fn sqlite_empty() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("entwine.db").display());
        let store = Store::open(&url, &StoreOptions::default()).expect("valid sqlite URL");
        Self {
            store,
            location: Location::Sqlite { url },
            cleanup: Cleanup::Dir(dir),
        }
    }

    /// A fresh, migrated PostgreSQL schema.
    pub async fn postgres() -> Self {
        let this = Self::postgres_empty().await;
        this.store.migrate().await.expect("migrations apply");
        this
    }

    /// A fresh, migrated SQLite file.
    pub async fn sqlite() -> Self {
        let this = Self::sqlite_empty();
        this.store.migrate().await.expect("migrations apply");
        this
    }

    /// Another pool on the same store, as a second process would open.
    pub fn reopen(&self) -> Store {
        match &self.location {
            Location::PostgresSchema { options, .. } => {
                Store::postgres((**options).clone(), &StoreOptions::default())
            }
            Location::Sqlite { url } => {
                Store::open(url, &StoreOptions::default()).expect("valid sqlite URL")
            }
        }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Cleanup::Schema(schema) = &self.cleanup {
            admin_blocking(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
}

/// A fresh PostgreSQL database for one test, dropped afterwards.
pub struct TestDatabase {
    /// Its name.
    pub name: String,
}

impl TestDatabase {
    /// Creates an empty database.
    pub async fn create() -> Self {
        let name = unique_name("entwine_test");
        admin(&format!("CREATE DATABASE {name}")).await;
        Self { name }
    }

    /// Connection options for it.
    pub fn options(&self) -> PgConnectOptions {
        admin_options().database(&self.name)
    }

    /// A URL for it.
    pub fn url(&self) -> String {
        let base = postgres_url();
        let (server, _) = base.rsplit_once('/').expect("URL has a database path");
        format!("{server}/{}", self.name)
    }

    /// A migrated store on it.
    pub async fn migrated_store(&self) -> Store {
        let store = Store::postgres(self.options(), &StoreOptions::default());
        store.migrate().await.expect("migrations apply");
        store
    }

    /// A connection to it, for assertions on its rows.
    pub async fn connect(&self) -> PgConnection {
        self.options()
            .connect()
            .await
            .expect("test database reachable")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        admin_blocking(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs raw SQL (several statements allowed) on a store, for setting up a test.
pub async fn execute(store: &Store, sql: &str) {
    let result = match store {
        Store::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        Store::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
    };
    result.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The value of a single-integer query (`SELECT COUNT(*) …`), for assertions.
pub async fn scalar(store: &Store, sql: &str) -> i64 {
    let result = match store {
        Store::Postgres(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await,
        Store::Sqlite(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await,
    };
    result.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Generates one test per backend from an async body taking a migrated `TestStore`:
/// `store_test!(name, |t| async move { … })` makes `name::postgres` and `name::sqlite`.
#[macro_export]
macro_rules! store_test {
    ($name:ident, |$t:ident| $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let $t = $crate::TestStore::postgres().await;
                $body.await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let $t = $crate::TestStore::sqlite().await;
                $body.await
            }
        }
    };
}

/// The MQTT broker tests use: `ENTWINE_TEST_MQTT`, by default `127.0.0.1:1883` (Mosquitto).
pub fn mqtt_address() -> (String, u16) {
    let raw = std::env::var("ENTWINE_TEST_MQTT").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let (host, port) = raw
        .rsplit_once(':')
        .expect("ENTWINE_TEST_MQTT is host:port");
    (
        host.to_owned(),
        port.parse().expect("ENTWINE_TEST_MQTT has a numeric port"),
    )
}

/// A name no other test uses: for device ids, client ids and topics on the shared broker.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A message a [`Subscriber`] received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// A real MQTT subscriber on the test broker, recording what arrives on its filters.
pub struct Subscriber {
    messages: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Subscribes (QoS 1) and returns once the broker has acknowledged the subscription.
    pub async fn start(filters: &[String]) -> Self {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (host, port) = mqtt_address();
        let mut options = MqttOptions::new(unique("test-sub"), host, port);
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        for filter in filters {
            client
                .subscribe(filter.clone(), QoS::AtLeastOnce)
                .await
                .expect("subscribe request");
        }
        let mut acked = 0;
        while acked < filters.len() {
            match tokio::time::timeout(std::time::Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("cannot reach the test broker at {:?}: {e}", mqtt_address()),
                Err(_) => panic!("no SUBACK from the test broker within 10 s"),
            }
        }
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    sink.lock().expect("not poisoned").push(Received {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        at: std::time::Instant::now(),
                    });
                }
            }
        });
        Self { messages, task }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.messages.lock().expect("not poisoned").clone()
    }

    /// Waits until `predicate` holds for what was received, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: std::time::Duration,
        what: &str,
        predicate: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let received = self.received();
            if predicate(&received) {
                return received;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; received {} messages",
                received.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `condition` every 20 ms until it holds, or panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A loopback port nothing listens on (bound, then released): for a server a test starts later,
/// or for a service that must look down.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A PostgreSQL cluster of the test's own (Debian's `pg_createcluster`, run as root), on a free
/// loopback port: for tests that crash, stop or reconfigure the database, which must never touch
/// the shared one. Local (Unix socket) connections are trusted; host connections need a
/// password (`scram-sha-256`); the superuser `postgres` has the password `postgres`. Dropped
/// (`pg_dropcluster --stop`) with its data when the guard goes, also when the test fails.
pub struct PgCluster {
    /// The PostgreSQL major version (the directory under `/etc/postgresql`).
    pub version: String,
    /// The cluster's name.
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl PgCluster {
    /// Creates the cluster (listening on localhost) and starts it; answers once it accepts
    /// connections as `postgres` over TCP with its password.
    pub async fn start() -> Self {
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("PostgreSQL is installed the Debian way (/etc/postgresql)")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter_map(|name| Some((name.parse::<f64>().ok()?, name)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, name)| name)
            .expect("a PostgreSQL version under /etc/postgresql");
        let this = Self {
            version,
            name: unique_name("entwine"),
            port: free_port(),
        };
        let port = this.port.to_string();
        this.ctl(
            "pg_createcluster",
            &[
                &this.version,
                &this.name,
                "-p",
                &port,
                "--start",
                "--start-conf=manual",
                "--",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
        )
        .await;
        // The superuser's password, over the trusted socket.
        let mut local = sqlx::postgres::PgConnectOptions::new()
            .socket("/var/run/postgresql")
            .port(this.port)
            .username("postgres")
            .database("postgres")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot reach cluster {}: {e}", this.name));
        sqlx::raw_sql("ALTER ROLE postgres PASSWORD 'postgres'")
            .execute(&mut local)
            .await
            .expect("set the superuser's password");
        let _ = local.close().await;
        this
    }

    /// Options for the superuser over TCP, database `postgres`.
    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .password("postgres")
            .database("postgres")
    }

    /// Runs `sql` (several statements allowed) as the superuser.
    pub async fn execute(&self, sql: &str) {
        let mut conn = self
            .options()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot reach cluster {}: {e}", self.name));
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
    }

    /// A crash: `pg_ctlcluster stop --mode immediate` (no checkpoint; recovery on the next start).
    pub async fn crash(&self) {
        self.ctl(
            "pg_ctlcluster",
            &[&self.version, &self.name, "stop", "--mode", "immediate"],
        )
        .await;
    }

    /// Starts it again (after [`PgCluster::crash`]); `pg_ctlcluster` waits until it is ready.
    pub async fn restart_after_crash(&self) {
        self.ctl("pg_ctlcluster", &[&self.version, &self.name, "start"])
            .await;
    }

    /// The server's log so far (for a failure's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(format!(
            "/var/log/postgresql/postgresql-{}-{}.log",
            self.version, self.name
        ))
        .unwrap_or_default()
    }

    async fn ctl(&self, program: &str, args: &[&str]) {
        let output = tokio::process::Command::new(program)
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {program} (as root, on Debian): {e}"));
        assert!(
            output.status.success(),
            "{program} {}: {}\n{}{}\nits log:\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_dropcluster")
            .args(["--stop", &self.version, &self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A Server-Sent Events response (`/api/stream`) read event by event.
pub struct EventStream {
    response: reqwest::Response,
    /// What was read and not yet taken: the start of the next events.
    pending: String,
}

impl EventStream {
    /// Reads `response`, an open `text/event-stream`.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            pending: String::new(),
        }
    }

    /// The `data` of the next event named `event`, parsed as JSON; events of other names and
    /// keep-alive comments before it are skipped. Panics after `timeout`, or when the stream
    /// ends first.
    pub async fn next(&mut self, event: &str, timeout: std::time::Duration) -> serde_json::Value {
        let head = format!("event: {event}");
        tokio::time::timeout(timeout, async {
            loop {
                while let Some(end) = self.pending.find("\n\n") {
                    let block: String = self.pending.drain(..end + 2).collect();
                    if block.lines().any(|l| l == head) {
                        let data = block
                            .lines()
                            .find_map(|l| l.strip_prefix("data: "))
                            .unwrap_or_else(|| panic!("no data in {block:?}"));
                        return serde_json::from_str(data)
                            .unwrap_or_else(|e| panic!("{data:?} is not JSON: {e}"));
                    }
                }
                let chunk = self
                    .response
                    .chunk()
                    .await
                    .expect("the stream reads")
                    .unwrap_or_else(|| panic!("the stream ended before a {event} event"));
                self.pending.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {event} event within {timeout:?}"))
    }

    /// Whether the stream ends within `timeout` (the server closed it).
    pub async fn ends_within(mut self, timeout: std::time::Duration) -> bool {
        tokio::time::timeout(timeout, async {
            while let Some(_chunk) = self.response.chunk().await.unwrap_or(None) {}
        })
        .await
        .is_ok()
    }
}
