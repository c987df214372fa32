//! `cargo xtask upload-bench`: upload throughput and the server's peak RSS
//! for one large upload over loopback, the floor set by `sha256sum` on the
//! same bytes, and chat latency of other clients while an upload runs.
//!
//! The server is the release binary on 127.0.0.1 with rate limits off; the
//! clients are `hubbub-client` in this process. Throughput is timed from the
//! moment `send_file` has hashed the file until `fileSaved` arrives, so it
//! covers the transfer, the server's writes, its hashing and its fsync.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hubbub_client::{Client, ClientConfig, Event, FileUpload};
use hubbub_loadgen::Histogram;
use hubbub_loadgen::process::peak_rss_bytes;

use crate::measure::{ServerProcess, date_and_commit, machine, replace_section};

/// Options of the command.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Size of the throughput upload, in MiB.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    size_mib: u64,
    /// Size of the upload that runs under the chat latency probe, in MiB.
    #[arg(long, value_name = "M", default_value_t = 100)]
    chat_size_mib: u64,
    /// Run this `hubbub` binary instead of building the workspace's, to
    /// compare two builds on the same machine.
    #[arg(long, value_name = "PATH")]
    server: Option<std::path::PathBuf>,
}

pub(crate) fn upload_bench(root: &Path, options: &Options) -> anyhow::Result<()> {
    let binary = match &options.server {
        Some(path) => path.clone(),
        None => {
            crate::run(root, "cargo", &["build", "--release", "--package", "hubbub"])?;
            // Wherever CARGO_TARGET_DIR put it.
            crate::target_dir(root).join("release/hubbub")
        }
    };
    let work = crate::target_dir(root).join("upload-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let big = work.join("big.bin");
    write_file(&big, options.size_mib)?;
    let small = work.join("chat.bin");
    write_file(&small, options.chat_size_mib)?;

    let started = Instant::now();
    let out = Command::new("sha256sum").arg(&big).output().context("running sha256sum")?;
    anyhow::ensure!(out.status.success(), "sha256sum failed");
    let sha256sum_time = started.elapsed();

    let max = (options.size_mib.max(options.chat_size_mib) + 1) << 20;
    let mut command = Command::new(binary);
    command
        .args(["--listen", "127.0.0.1:0", "--log", "warn", "--no-rate-limit"])
        .arg("--upload-dir")
        .arg(work.join("uploads"))
        .env("HUBBUB_UPLOADS_MAX_FILE_SIZE", max.to_string())
        .env("HUBBUB_UPLOADS_QUOTA_BYTES", (4 * max).to_string())
        // Every upload comes from this one address.
        .env("HUBBUB_UPLOADS_MAX_RESERVED_BYTES_PER_OWNER", (4 * max).to_string());
    let server = ServerProcess::start(command)?;
    let url = format!("ws://{}/ws/chat", server.addr);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(async {
        let rss_before = server.rss()?;
        let upload = timed_upload(&url, &big).await?;
        let peak = peak_rss_bytes(server.pid())?;
        let idle = chat_latency(&url, None).await?;
        let busy = chat_latency(&url, Some(&small)).await?;
        anyhow::Ok((rss_before, upload, peak, idle, busy))
    })?;
    let (rss_before, upload, peak, idle, busy) = report;
    let size = options.size_mib << 20;
    let mib_s = |bytes: u64, d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let (date, commit) = date_and_commit(root);
    let mut table = String::new();
    table.push_str(&format!(
        "Measured {date} on commit `{commit}`, {}, with `cargo xtask upload-bench --size-mib {} --chat-size-mib {}`.\n\n",
        machine(),
        options.size_mib,
        options.chat_size_mib
    ));
    table.push_str("| measure | value |\n| --- | --- |\n");
    table.push_str(&format!(
        "| upload of {} MiB over loopback | {:.1} s, {:.0} MiB/s |\n",
        options.size_mib,
        upload.as_secs_f64(),
        mib_s(size, upload)
    ));
    table.push_str(&format!(
        "| `sha256sum` of the same file (the floor) | {:.1} s, {:.0} MiB/s |\n",
        sha256sum_time.as_secs_f64(),
        mib_s(size, sha256sum_time)
    ));
    table.push_str(&format!(
        "| upload throughput / sha256sum throughput | {:.0} % |\n",
        100.0 * sha256sum_time.as_secs_f64() / upload.as_secs_f64()
    ));
    table.push_str(&format!(
        "| server RSS before the upload / peak during it | {:.1} MiB / {:.1} MiB |\n",
        rss_before as f64 / (1 << 20) as f64,
        peak as f64 / (1 << 20) as f64
    ));
    table.push_str(&format!(
        "| chat latency p50 / p99, idle ({} messages) | {:.2} ms / {:.2} ms |\n",
        idle.count, idle.p50_ms, idle.p99_ms
    ));
    table.push_str(&format!(
        "| chat latency p50 / p99 during a {} MiB upload ({} messages) | {:.2} ms / {:.2} ms |\n",
        options.chat_size_mib, busy.count, busy.p50_ms, busy.p99_ms
    ));
    eprintln!("\n{table}");
    // A binary from elsewhere is a comparison, not this commit's figures.
    if options.server.is_none() {
        replace_section(&root.join("docs/BENCHMARKS.md"), "upload", "## Uploads", &table)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Writes `mib` MiB of pseudo-random bytes (xorshift: fast, incompressible
/// enough that nothing on the way can cheat).
fn write_file(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0_u8; 1 << 20];
    for _ in 0..mib {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block)?;
    }
    file.flush()?;
    Ok(())
}

fn config() -> ClientConfig {
    ClientConfig { send_rate: None, ..ClientConfig::default() }
}

/// Uploads `path` and returns the time from the end of hashing to `fileSaved`.
async fn timed_upload(url: &str, path: &Path) -> anyhow::Result<Duration> {
    let (client, mut events) = Client::connect(url, config()).await?;
    client.set_username("uploader").await?;
    let file = FileUpload::from_path(path).await?;
    let transfer = client.send_file(file).await?;
    let started = Instant::now();
    loop {
        match events.recv().await {
            Some(Event::FileSaved { transfer_id, .. }) if transfer_id == transfer => break,
            Some(Event::FileFailed { message, .. }) => bail!("upload failed: {message}"),
            Some(_) => {}
            None => bail!("the client stopped"),
        }
    }
    let elapsed = started.elapsed();
    client.disconnect().await;
    Ok(elapsed)
}

/// Latency percentiles of chat messages.
struct Latency {
    count: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// One member sends a message every 10 ms to another in the same room, for
/// as long as `upload` takes (or 5 s without one); returns the delivery
/// latencies.
async fn chat_latency(url: &str, upload: Option<&Path>) -> anyhow::Result<Latency> {
    let room = format!("probe-{}", upload.is_some());
    let (sender, _sender_events) = Client::connect(url, config()).await?;
    sender.set_username("sender").await?;
    sender.join_room(&room).await?;
    let (receiver, mut received) = Client::connect(url, config()).await?;
    receiver.set_username("receiver").await?;
    receiver.join_room(&room).await?;
    loop {
        if let Some(Event::RoomJoined { .. }) = received.recv().await {
            break;
        }
    }
    let uploading = match upload {
        Some(path) => {
            let (uploader, events) = Client::connect(url, config()).await?;
            uploader.set_username("uploader").await?;
            let file = FileUpload::from_path(path).await?;
            let transfer = uploader.send_file(file).await?;
            Some((uploader, events, transfer))
        }
        None => None,
    };
    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    let waiter = tokio::spawn(async move {
        match uploading {
            Some((uploader, mut events, transfer)) => {
                while let Some(event) = events.recv().await {
                    if matches!(&event, Event::FileSaved { transfer_id, .. } if *transfer_id == transfer) {
                        break;
                    }
                }
                uploader.disconnect().await;
            }
            None => tokio::time::sleep(Duration::from_secs(5)).await,
        }
        let _ = done_tx.send(());
    });

    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Histogram::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut index = 0_u64;
    loop {
        tokio::select! {
            _ = &mut done => break,
            _ = tick.tick() => {
                let text = format!("probe {index}");
                index += 1;
                sent.insert(text.clone(), Instant::now());
                sender.send_message(text).await?;
            }
            event = received.recv() => match event {
                Some(Event::Message { text, .. }) => {
                    if let Some(at) = sent.remove(&text) {
                        latencies.record(at.elapsed().as_micros() as u64);
                    }
                }
                Some(_) => {}
                None => bail!("the receiver stopped"),
            },
        }
    }
    waiter.await?;
    sender.disconnect().await;
    receiver.disconnect().await;
    anyhow::ensure!(latencies.count() > 0, "no chat message arrived");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let [p50, _, p99, ..] = latencies.summary();
    Ok(Latency { count: latencies.count(), p50_ms: ms(p50), p99_ms: ms(p99) })
}
