//! Builds the dashboard's assets into the crate.
//!
//! The front-end libraries are npm packages, declared in `package.json` and pinned, with their
//! sha512 integrity, in `package-lock.json`; none is copied into the repository. For each file
//! the dashboard takes from a package ([`VENDORED`]), this script:
//!
//! 1. finds the package's tarball: in `$ENTWINE_WEB_TARBALLS` when set (a directory holding
//!    `<name>-<version>.tgz`, as `npm pack <name>@<version>` writes it: the offline path), else
//!    in the download cache (`$ENTWINE_WEB_CACHE`, default `$CARGO_HOME/entwine-web` or
//!    `~/.cargo/entwine-web`), else downloads it from the registry (the lock's `resolved`, or
//!    `https://registry.npmjs.org/<name>/-/<name>-<version>.tgz`) into the cache;
//! 2. checks it against the lock's `integrity` (sha512), and refuses to build on a mismatch;
//! 3. unpacks the file from it.
//!
//! Then every asset (the crate's own `assets/` and the vendored files) is gzipped, and
//! `assets.rs` is written into `OUT_DIR`: a table of names, content types, ETags, and the bytes
//! (`include_bytes!`), with a build hash over all of them, under which the page names them so
//! that they can be cached for good.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest, Sha256, Sha512};

/// The files the dashboard takes from npm packages: (package, path in the tarball, asset name).
const VENDORED: &[(&str, &str, &str)] = &[
    (
        "uplot",
        "package/dist/uPlot.iife.min.js",
        "uPlot.iife.min.js",
    ),
    ("uplot", "package/dist/uPlot.min.css", "uPlot.min.css"),
];

/// The largest tarball accepted from the registry.
const MAX_TARBALL: u64 = 32 << 20;

type BuildResult<T> = Result<T, String>;

fn main() {
    if let Err(e) = run() {
        // A build script's failure is shown to the user: say what to do.
        eprintln!("entwine-web: {e}");
        std::process::exit(1);
    }
}

fn run() -> BuildResult<()> {
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env("OUT_DIR")?);
    let lock_path = manifest.join("package-lock.json");
    let assets_dir = manifest.join("assets");
    println!("cargo:rerun-if-changed={}", lock_path.display());
    println!("cargo:rerun-if-changed={}", assets_dir.display());
    println!("cargo:rerun-if-env-changed=ENTWINE_WEB_TARBALLS");
    println!("cargo:rerun-if-env-changed=ENTWINE_WEB_CACHE");

    let lock = std::fs::read_to_string(&lock_path)
        .map_err(|e| format!("reading {}: {e}", lock_path.display()))?;
    let lock: serde_json::Value = serde_json::from_str(&lock)
        .map_err(|e| format!("{}: not JSON: {e}", lock_path.display()))?;

    // name -> bytes, in name order so the build hash is stable.
    let mut assets: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut tarballs: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for (package, inner, name) in VENDORED {
        if !tarballs.contains_key(package) {
            let tarball = tarball(&lock, package)?;
            tarballs.insert(package, tarball);
        }
        let file =
            extract(&tarballs[package], inner).map_err(|e| format!("{package}'s tarball: {e}"))?;
        assets.insert((*name).to_string(), file);
    }
    let entries = std::fs::read_dir(&assets_dir)
        .map_err(|e| format!("reading {}: {e}", assets_dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", assets_dir.display()))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| format!("asset name {n:?} is not UTF-8"))?;
        if assets.contains_key(&name) {
            return Err(format!("asset {name} is both in assets/ and vendored"));
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        assets.insert(name, bytes);
    }
    write_table(&out, &assets)
}

fn env(name: &str) -> BuildResult<String> {
    std::env::var(name).map_err(|_| format!("{name} is not set (run through cargo)"))
}

/// The verified tarball of `package` at the version `lock` pins.
fn tarball(lock: &serde_json::Value, package: &str) -> BuildResult<Vec<u8>> {
    let key = format!("node_modules/{package}");
    let entry = &lock["packages"][&key];
    let field = |name: &str| {
        entry[name].as_str().ok_or_else(|| {
            format!(
                "package-lock.json: packages.{key:?}.{name} is missing \
                 (run `npm install --package-lock-only` in crates/entwine-web)"
            )
        })
    };
    let version = field("version")?;
    let integrity = field("integrity")?;
    let expected = integrity
        .split_whitespace()
        .find_map(|i| i.strip_prefix("sha512-"))
        .ok_or_else(|| format!("{package}@{version}: no sha512 integrity in {integrity:?}"))?;
    let expected = base64::engine::general_purpose::STANDARD
        .decode(expected)
        .map_err(|e| format!("{package}@{version}: integrity is not base64: {e}"))?;
    let file_name = format!("{package}-{version}.tgz");
    let verify = |bytes: &[u8]| Sha512::digest(bytes).as_slice() == expected.as_slice();

    if let Ok(dir) = std::env::var("ENTWINE_WEB_TARBALLS") {
        let path = Path::new(&dir).join(&file_name);
        println!("cargo:rerun-if-changed={}", path.display());
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "ENTWINE_WEB_TARBALLS={dir}: reading {}: {e} (`npm pack {package}@{version}` \
                 writes it)",
                path.display()
            )
        })?;
        if !verify(&bytes) {
            return Err(integrity_mismatch(
                package,
                version,
                &path.display().to_string(),
            ));
        }
        return Ok(bytes);
    }

    let cache = cache_dir();
    let cached = cache.as_ref().map(|dir| dir.join(&file_name));
    if let Some(bytes) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
        if verify(&bytes) {
            return Ok(bytes);
        }
        // A partial or corrupted download: fetch it again.
    }
    let url = match entry["resolved"].as_str() {
        Some(url) => url.to_string(),
        None => format!("https://registry.npmjs.org/{package}/-/{file_name}"),
    };
    let bytes = download(&url).map_err(|e| {
        format!(
            "downloading {url}: {e}; offline, set ENTWINE_WEB_TARBALLS to a directory holding \
             {file_name} (`npm pack {package}@{version}`)"
        )
    })?;
    if !verify(&bytes) {
        return Err(integrity_mismatch(package, version, &url));
    }
    if let (Some(dir), Some(path)) = (cache, cached) {
        // The cache is a convenience: failing to write it only means downloading again.
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            let partial = dir.join(format!("{file_name}.{}.partial", std::process::id()));
            std::fs::write(&partial, &bytes)?;
            std::fs::rename(&partial, &path)
        });
        if let Err(e) = written {
            println!(
                "cargo:warning=entwine-web: not cached in {}: {e}",
                dir.display()
            );
        }
    }
    Ok(bytes)
}

fn integrity_mismatch(package: &str, version: &str, source: &str) -> String {
    format!(
        "{package}@{version} from {source} does not match the sha512 integrity of \
         package-lock.json: refusing to build with it"
    )
}

/// Where downloaded tarballs are kept between builds.
fn cache_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("ENTWINE_WEB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(cargo_home.join("entwine-web"))
}

fn download(url: &str) -> BuildResult<Vec<u8>> {
    // ureq's rustls without a bundled provider or CA list: ring, and the system's roots.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = rustls_native_certs::load_native_certs();
    if roots.certs.is_empty() {
        return Err(format!("no system CA certificates: {:?}", roots.errors));
    }
    let roots: Vec<_> = roots
        .certs
        .into_iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_TARBALL)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

/// The file at `inner` in the gzipped tarball.
fn extract(tarball: &[u8], inner: &str) -> BuildResult<Vec<u8>> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tarball));
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?;
        if path.to_str() == Some(inner) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
            return Ok(bytes);
        }
    }
    Err(format!("no {inner} in it"))
}

fn content_type(name: &str) -> BuildResult<&'static str> {
    Ok(match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => return Err(format!("asset {name}: no content type for its extension")),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn write_table(out: &Path, assets: &BTreeMap<String, Vec<u8>>) -> BuildResult<()> {
    let mut build = Sha256::new();
    for (name, bytes) in assets {
        build.update(name.as_bytes());
        build.update((bytes.len() as u64).to_le_bytes());
        build.update(bytes);
    }
    let build = hex(&build.finalize()[..6]);
    let dir = out.join("assets");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "/// A hash of every asset, in the path the page names them by."
    );
    let _ = writeln!(table, "pub(crate) const BUILD: &str = {build:?};");
    let _ = writeln!(
        table,
        "/// Every asset: name, content type, ETag, bytes, gzipped bytes."
    );
    let _ = writeln!(table, "pub(crate) static ASSETS: &[Asset] = &[");
    for (name, bytes) in assets {
        let bytes = if name == "index.html" {
            // The page names the assets under the build hash.
            String::from_utf8(bytes.clone())
                .map_err(|_| "index.html is not UTF-8".to_string())?
                .replace("{{build}}", &build)
                .into_bytes()
        } else {
            bytes.clone()
        };
        let etag = format!("\"{}\"", hex(&Sha256::digest(&bytes)[..8]));
        let plain = dir.join(name);
        let gzipped = dir.join(format!("{name}.gz"));
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder
            .write_all(&bytes)
            .and_then(|()| encoder.finish())
            .and_then(|gz| std::fs::write(&gzipped, gz))
            .map_err(|e| format!("writing {}: {e}", gzipped.display()))?;
        std::fs::write(&plain, &bytes).map_err(|e| format!("writing {}: {e}", plain.display()))?;
        let _ = writeln!(
            table,
            "    Asset {{ name: {name:?}, content_type: {:?}, etag: {etag:?}, \
             bytes: include_bytes!({:?}), gzip: include_bytes!({:?}) }},",
            content_type(name)?,
            plain.display().to_string(),
            gzipped.display().to_string(),
        );
    }
    let _ = writeln!(table, "];");
    let path = out.join("assets.rs");
    std::fs::write(&path, table).map_err(|e| format!("writing {}: {e}", path.display()))
}
