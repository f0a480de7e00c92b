//! History at scale: fills a fresh PostgreSQL database with `DEVICES × STATES` states (1 s
//! apart per device, as the pipeline writes them: physical state, digital state, the window
//! copy the trigger makes, a twin row per device), then times the queries that must stay flat
//! as history grows: the series of one twin over 1 h and over its whole history (1 day),
//! the twin handler's window query (`Store::state_window`), the twins listing
//! (`Store::twins`), and one retention run deleting the older half.
//!
//! ```text
//! cargo run --release -p entwine-store --example history_bench -- \
//!     postgres://postgres@127.0.0.1:5432/postgres DEVICES STATES [RUNS]
//! ```
//! The database `entwine_history_bench` is created on the server of the URL and dropped at the
//! end (`scripts/bench-history` runs it at two sizes).

use std::time::{Duration, Instant};

use entwine_core::odte::OdteConfig;
use entwine_store::{retention_guard_ms, Store, StoreOptions, SERIES_POSTGRES};
use sqlx::{Connection, PgConnection};

const DATABASE: &str = "entwine_history_bench";
/// Rows of states per filling statement (the window copy's trigger sees one statement's rows).
const CHUNK_STATES: i64 = 1_000_000;

fn usage() -> ! {
    eprintln!("usage: history_bench POSTGRES_URL DEVICES STATES_PER_DEVICE [RUNS]");
    std::process::exit(2)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn summary(what: &str, mut times: Vec<Duration>) {
    times.sort_unstable();
    println!(
        "{what:<44} p50 {:>10}  p95 {:>10}  max {:>10}  ({} runs)",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.95)),
        ms(*times.last().unwrap()),
        times.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        usage();
    }
    let admin_url = &args[0];
    let devices: i64 = args[1].parse().unwrap_or_else(|_| usage());
    let per_device: i64 = args[2].parse().unwrap_or_else(|_| usage());
    let runs: usize = args
        .get(3)
        .map_or(Ok(50), |r| r.parse())
        .unwrap_or_else(|_| usage());
    if devices < 1 || per_device < 2 || runs < 1 {
        usage();
    }
    let total = devices * per_device;
    println!("history bench: {devices} devices × {per_device} states = {total} states, {runs} runs per query");

    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE}"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
        .execute(&mut admin)
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(server, _)| server)
        .ok_or("the URL names no database")?;
    let url = format!("{base}/{DATABASE}");
    let result = run(&url, devices, per_device, runs).await;
    let store_closed = sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    result?;
    store_closed?;
    Ok(())
}

async fn run(
    url: &str,
    devices: i64,
    per_device: i64,
    runs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open(url, &StoreOptions::default())?;
    store.migrate().await?;
    let Store::Postgres(pool) = &store else {
        return Err("not PostgreSQL".into());
    };
    // The last state of every device is at `end`; the first `per_device − 1` seconds before.
    let end: i64 = 1_800_000_000_000;
    let start = end - (per_device - 1) * 1000;

    sqlx::query("ALTER TABLE digitalstate DISABLE TRIGGER digitalstate_window_copy")
        .execute(pool)
        .await?;
    let filling = Instant::now();
    let seconds_per_chunk = (CHUNK_STATES / devices).max(1);
    let mut s = 0;
    while s < per_device {
        let last = (s + seconds_per_chunk).min(per_device) - 1;
        let max_id = "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM physicalstate";
        let (before,): (i64,) = sqlx::query_as(max_id).fetch_one(pool).await?;
        // Physical states in time order, devices interleaved (as they arrive); the seed's
        // readings; 10 ms of latency.
        sqlx::query(
            "INSERT INTO physicalstate (device_id, device_timestamp, timestamp, temperature, energy) \
             SELECT 'bench-' || d, $1 + s * 1000 - 10, $1 + s * 1000, \
                    20 + (s % 100) / 10.0, 1 + (d % 7) \
             FROM generate_series($2::bigint, $3::bigint) s CROSS JOIN generate_series(1, $4::int) d \
             ORDER BY s, d",
        )
        .bind(start)
        .bind(s)
        .bind(last)
        .bind(devices as i32)
        .execute(pool)
        .await?;
        let (after,): (i64,) = sqlx::query_as(max_id).fetch_one(pool).await?;
        // Their digital states, evaluated, and the window copies the trigger would make (made
        // here in one set-based statement: the trigger's per-row probe is for small batches).
        sqlx::query(
            "INSERT INTO digitalstate (physicalstate_id, device_id, timestamp, temperature, energy, \
                                       availability, reliability, timeliness, odte, lifecycle) \
             SELECT p.id, p.device_id, p.timestamp, p.temperature, p.energy, \
                    1, 0.9 + (p.id % 10) / 100.0, 1, 0.9 + (p.id % 10) / 100.0, 'entangled' \
             FROM physicalstate p WHERE p.id > $1 AND p.id <= $2 ORDER BY p.id",
        )
        .bind(before)
        .bind(after)
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO digitalstate_window (digitalstate_id, device_id, timestamp, device_timestamp) \
             SELECT d.id, d.device_id, d.timestamp, p.device_timestamp \
             FROM digitalstate d JOIN physicalstate p ON p.id = d.physicalstate_id \
             WHERE d.physicalstate_id > $1 AND d.physicalstate_id <= $2",
        )
        .bind(before)
        .bind(after)
        .execute(pool)
        .await?;
        s = last + 1;
        println!(
            "  filled {} states ({:.0} s)",
            s * devices,
            filling.elapsed().as_secs_f64()
        );
    }
    sqlx::query(
        "INSERT INTO twin (device_id, lifecycle, since, bound_at, digitalstate_id, last_update, \
                           last_device_timestamp, evaluated_at, availability, reliability, \
                           timeliness, odte) \
         SELECT d.device_id, 'entangled', $1, $1, d.id, d.timestamp, d.timestamp - 10, \
                d.timestamp, 1, 1, 1, 1 \
         FROM digitalstate d WHERE d.timestamp = $2",
    )
    .bind(start)
    .bind(end)
    .execute(pool)
    .await?;
    sqlx::query("ALTER TABLE digitalstate ENABLE TRIGGER digitalstate_window_copy")
        .execute(pool)
        .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    let fill = filling.elapsed();
    let size: (i64,) = sqlx::query_as("SELECT pg_database_size(current_database())")
        .fetch_one(pool)
        .await?;
    println!(
        "filled {} states in {:.0} s (ANALYZE included); database {:.2} GiB",
        devices * per_device,
        fill.as_secs_f64(),
        size.0 as f64 / (1u64 << 30) as f64
    );

    // One device per run, spread over the fleet.
    let device = |i: usize| format!("bench-{}", 1 + (i as i64 * 7919) % devices);

    // The series query's plan at this size, for the record.
    let plan: Vec<(String,)> = sqlx::query_as(&format!(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {SERIES_POSTGRES}"
    ))
    .bind(device(0))
    .bind(end + 1 - 3_600_000)
    .bind(end + 1)
    .bind(10_000_i64)
    .fetch_all(pool)
    .await?;
    println!("plan of the series query (1 h of one device, step 10 s):");
    for (line,) in plan {
        println!("    {line}");
    }

    let mut hour = Vec::new();
    let mut day = Vec::new();
    let mut buckets = (0, 0);
    for i in 0..runs {
        let t = Instant::now();
        let series = store
            .series(&device(i), end + 1 - 3_600_000, end + 1, 10_000)
            .await?;
        hour.push(t.elapsed());
        buckets.0 = series.buckets.len();
        let t = Instant::now();
        let series = store
            .series(&device(i), end + 1 - 86_400_000, end + 1, 300_000)
            .await?;
        day.push(t.elapsed());
        buckets.1 = series.buckets.len();
    }
    summary(
        &format!("series 1 h, step 10 s ({} buckets)", buckets.0),
        hour,
    );
    summary(
        &format!("series 1 day, step 5 min ({} buckets)", buckets.1),
        day,
    );

    let config = OdteConfig::seed_default();
    let latest: Vec<(i32,)> = sqlx::query_as("SELECT digitalstate_id FROM twin ORDER BY device_id")
        .fetch_all(pool)
        .await?;
    let mut window = Vec::new();
    for i in 0..runs {
        let id = latest[(i * 7919) % latest.len()].0;
        let t = Instant::now();
        let figures = store.state_window(id, &config).await?;
        window.push(t.elapsed());
        assert!(figures.is_some_and(|f| f.stats.states > 0));
    }
    summary("twin handler's window (state_window)", window);

    let mut listing = Vec::new();
    let mut twins = 0;
    for _ in 0..runs {
        let t = Instant::now();
        twins = store.twins().await?.len();
        listing.push(t.elapsed());
    }
    summary(&format!("twins listing ({twins} twins)"), listing);

    // Retention keeping the newer half.
    let keep = per_device / 2 * 1000;
    let guard = retention_guard_ms(&config);
    let report = store.apply_retention(Some(keep), end, guard).await?;
    println!(
        "retention keeping {} s (cutoff {:?}): {} digital and {} physical states deleted in {:.1} s ({:.0} states/s)",
        keep / 1000,
        report.cutoff_ms,
        report.digital_states,
        report.physical_states,
        report.duration.as_secs_f64(),
        report.digital_states as f64 / report.duration.as_secs_f64()
    );
    let left: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM digitalstate")
        .fetch_one(pool)
        .await?;
    println!("  {} digital states left", left.0);
    store.close().await;
    Ok(())
}
