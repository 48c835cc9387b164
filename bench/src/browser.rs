//! A real headless Chromium, driven over WebDriver through Debian's
//! `chromedriver`, for the dashboard's bench and its tests (which include
//! this file by path).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

use crate::free_port;

/// How long a page may take to show what is waited for.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A `chromedriver` process on a loopback port; killed when dropped.
pub struct ChromeDriver {
    child: Child,
    pub url: String,
}

fn find(program: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "`{program}` is not installed: the dashboard's tests and bench need Debian's `chromium` and \
         `chromium-driver` packages (scripts/test and bench/run install them)"
    );
    path
}

impl ChromeDriver {
    pub fn start() -> ChromeDriver {
        let port = free_port();
        // A process group of its own, so that dropping it also ends the
        // browsers it started (a test that fails never closes its window).
        let child = Command::new(find("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A new headless browser window of `width` × `height`.
    pub async fn browser(&self, width: u32, height: u32) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": find("chromium"),
                // No sandbox: tests run as root, where Chromium's sandbox
                // refuses to start.
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("chromedriver starts a headless Chromium")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // SAFETY: signals the process group this driver leads; no memory
        // is involved.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Runs `script` (a function body that returns a value) in the page.
pub async fn page_value(browser: &Client, script: &str) -> Value {
    browser.execute(script, vec![]).await.expect("the script runs")
}

/// Polls `script` in the page until it returns `true`; on timeout fails
/// with what the page shows.
pub async fn wait_page(browser: &Client, what: &str, script: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if page_value(browser, script).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let text = page_value(browser, "return document.body.innerText").await;
            panic!(
                "the page never showed {what}; it shows:\n{}",
                text.as_str().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
