//! Seeing the cluster: a `hivemind up` process with 50 roles loaded.
//! Prints the `/metrics` scrape time (median and p99 of sequential scrapes
//! on a keep-alive connection; target ≤ 10 ms), the dashboard's page
//! weight, and its time to first render in headless Chromium on loopback
//! (navigation start to the page's `hivemind-first-render` mark, which it
//! sets once every panel has drawn from the API's answers).

use std::time::{Duration, Instant};

use hivemind_bench::browser::{ChromeDriver, page_value, wait_page};
use hivemind_bench::{HostProcess, drop_role, millis, one_node_args, summarize, verdict};

const ROLES: usize = 50;
const SCRAPES: usize = 300;
const RENDERS: usize = 7;
/// The scrape-time target.
const SCRAPE_TARGET: Duration = Duration::from_millis(10);

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let host = HostProcess::spawn(dir.path(), &one_node_args(dir.path(), &[]))?.wait_api()?;
    let noop = std::fs::read(hivemind_role_artifacts::ROLE_NOOP)?;
    for index in 1..=ROLES {
        drop_role(&dir.path().join("roles"), &format!("role-{index:02}"), &noop)?;
    }
    host.wait_roles_running(ROLES)?;
    // A call into each role, so every latency histogram has samples.
    for index in 1..=ROLES {
        host.api.get(&format!("/v1/roles/role-{index:02}/ping"))?;
    }

    let mut samples = Vec::with_capacity(SCRAPES);
    let mut bytes = 0;
    let mut series = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let (status, body) = host.api.get("/metrics")?;
        samples.push(started.elapsed());
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        bytes = body.len();
        series = body
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
            .count();
    }
    let scrape = summarize(&mut samples);
    println!("/metrics with {ROLES} roles loaded ({SCRAPES} sequential scrapes, keep-alive, loopback)");
    println!(
        "  {series} series, {:.0} KiB   median {:.2} ms   p99 {:.2} ms   target p99 <= {} ms: {}",
        bytes as f64 / 1024.0,
        millis(scrape.median),
        millis(scrape.p99),
        SCRAPE_TARGET.as_millis(),
        verdict(scrape.p99 <= SCRAPE_TARGET)
    );

    let mut weight = Vec::new();
    for path in ["/", "/ui/app.js", "/ui/style.css"] {
        let (status, body) = host.api.get(path)?;
        anyhow::ensure!(status == 200, "{path} answered {status}");
        weight.push((path, body.len()));
    }
    let api_bytes: usize = ["/v1/status", "/v1/roles", "/v1/nodes", "/v1/bridges"]
        .iter()
        .map(|path| host.api.get(path).map(|(_, body)| body.len()))
        .sum::<Result<usize, _>>()?;
    let total: usize = weight.iter().map(|(_, size)| size).sum();
    println!("dashboard page weight (no compression; nothing fetched from elsewhere)");
    println!(
        "  {:.1} KiB: {}   + {:.1} KiB of API answers for its first render with {ROLES} roles",
        total as f64 / 1024.0,
        weight
            .iter()
            .map(|(path, size)| format!("{path} {:.1} KiB", *size as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", "),
        api_bytes as f64 / 1024.0
    );

    let runtime = tokio::runtime::Runtime::new()?;
    let renders = runtime.block_on(async {
        let driver = ChromeDriver::start();
        let browser = driver.browser(1400, 1000).await;
        let url = format!("{}/#token={}", host.api.base(), host.api.token());
        let mut renders = Vec::with_capacity(RENDERS);
        // The first load warms Chromium's own caches; it is not counted.
        for round in 0..=RENDERS {
            browser.goto("about:blank").await?;
            browser.goto(&url).await?;
            wait_page(
                &browser,
                "its first render",
                "return document.body.dataset.ready === '1'",
            )
            .await;
            let mark = page_value(
                &browser,
                "return performance.getEntriesByName('hivemind-first-render')[0].startTime",
            )
            .await;
            let elapsed = mark.as_f64().ok_or_else(|| anyhow::anyhow!("no render mark: {mark}"))?;
            if round > 0 {
                renders.push(Duration::from_secs_f64(elapsed / 1000.0));
            }
        }
        browser.close().await?;
        anyhow::Ok(renders)
    })?;
    let in_order = renders.clone();
    let mut renders = renders;
    let render = summarize(&mut renders);
    println!("dashboard time to first render in headless Chromium ({RENDERS} loads, loopback, {ROLES} roles)");
    println!(
        "  median {:.0} ms   max {:.0} ms   (in order: {} ms)",
        millis(render.median),
        millis(*renders.iter().max().unwrap_or(&Duration::ZERO)),
        in_order
            .iter()
            .map(|render| format!("{:.0}", millis(*render)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    host.stop()
}
