//! The web dashboard in a real headless Chromium (Debian's `chromium`,
//! driven over WebDriver by its `chromedriver`), against three real
//! `hivemind` processes on loopback running the bundled roles and a bridge
//! in front of a real TCP backend.

#[path = "../bench/src/browser.rs"]
mod browser;
mod support;

use browser::{ChromeDriver, page_value, wait_page};
use fantoccini::Locator;
use serde_json::Value;
use support::backend::{Backend, Manner, Session, bridge_section};
use support::*;

/// Clicks the element `css` selects.
async fn click(browser: &fantoccini::Client, css: &str) {
    let element = browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|error| panic!("{css}: {error}"));
    element
        .click()
        .await
        .unwrap_or_else(|error| panic!("click {css}: {error}"));
}

/// Types `text` into the field `css` selects.
async fn type_into(browser: &fantoccini::Client, css: &str, text: &str) {
    let element = browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|error| panic!("{css}: {error}"));
    element
        .send_keys(text)
        .await
        .unwrap_or_else(|error| panic!("type into {css}: {error}"));
}

/// The page shows the three nodes and the bundled roles; disabling the
/// bridge from the page, with a reason, severs its sessions on the node and
/// shows the reason; an event emitted through the API shows in the tail;
/// a killed node turns unhealthy. Leaves a screenshot in the target dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_and_controls_a_live_cluster() {
    let driver = ChromeDriver::start();
    let backend = Backend::start("a", Manner::Greet);
    let bridge_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut cluster = tokio::task::block_in_place(|| {
        ProcessCluster::bootstrap_configured(3, |index, node| {
            install_bundled_roles(node);
            use_config(node, &bridge_section("app", bridge_ports[index], "", &[(&backend, "")]));
        })
    });
    let first = &cluster.nodes[0];
    let (mut session, greeting) =
        tokio::task::block_in_place(|| wait_for("a session through the bridge", || Session::open(bridge_ports[0])));
    assert_eq!(greeting, "a");

    let browser = driver.browser(1400, 1400).await;
    let token = std::fs::read_to_string(first.dir.join("token")).unwrap();
    browser
        .goto(&format!("http://{}/#token={}", first.api, token.trim()))
        .await
        .unwrap();
    wait_page(
        &browser,
        "its first render",
        "return document.body.dataset.ready === '1'",
    )
    .await;
    // The token left the address bar once the page took it.
    let address = browser.current_url().await.unwrap();
    assert!(!address.as_str().contains("token"), "{address}");

    wait_page(
        &browser,
        "three healthy nodes",
        "return document.querySelectorAll('[data-node]').length === 3 && \
         document.querySelectorAll('[data-node][data-health=healthy]').length === 3",
    )
    .await;
    for role in ["dns", "host-events", "nginx"] {
        wait_page(
            &browser,
            &format!("the {role} role running"),
            &format!("return !!document.querySelector('[data-role=\"{role}\"][data-state=running]')"),
        )
        .await;
    }

    // Disable the bridge from the page, with a reason.
    let reason = "maintenance window, from the dashboard";
    wait_page(
        &browser,
        "the bridge routing to a",
        "const bridge = document.querySelector('[data-bridge=app]'); \
         return !!bridge && bridge.dataset.routing === 'on' && \
         bridge.querySelector('.active-backend').textContent.includes('a')",
    )
    .await;
    type_into(&browser, "[data-bridge='app'] input.reason", reason).await;
    click(&browser, "[data-bridge='app'] [data-action='disable']").await;
    wait_page(
        &browser,
        "routing off with the reason",
        &format!(
            "const bridge = document.querySelector('[data-bridge=app]'); \
             return bridge.dataset.routing === 'off' && \
             bridge.querySelector('.routing-reason').textContent.includes({reason:?})"
        ),
    )
    .await;
    tokio::task::block_in_place(|| {
        session.wait_closed("the session after routing went off from the page");
        for (node, port) in cluster.nodes.iter().zip(&bridge_ports) {
            wait_for(&format!("{} refuses clients", node.name), || {
                Session::open(*port).is_none().then_some(())
            });
        }
    });
    let status = page_value(
        &browser,
        "return document.querySelector('[data-bridge=app] .action-error').textContent",
    )
    .await;
    assert_eq!(status, Value::String(String::new()), "the page showed an error");

    // An event emitted elsewhere appears in the live tail.
    let seq = tokio::task::block_in_place(|| cluster.nodes[1].emit("dashboard.check", "from-the-test")).unwrap();
    wait_page(
        &browser,
        "the new event in the tail",
        &format!(
            "const item = document.querySelector('#events [data-seq=\"{seq}\"]'); \
             return !!item && item.textContent.includes('dashboard.check') && \
             item.textContent.includes('from-the-test')"
        ),
    )
    .await;

    // Text from the log is shown as text, never as markup.
    let hostile = r#"<img src=x onerror="document.body.dataset.injected='1'">"#;
    let seq = tokio::task::block_in_place(|| cluster.nodes[1].emit("dashboard.check", hostile)).unwrap();
    wait_page(
        &browser,
        "the hostile key as text",
        &format!(
            "const item = document.querySelector('#events [data-seq=\"{seq}\"]'); \
             return !!item && item.textContent.includes({hostile:?})"
        ),
    )
    .await;
    assert_eq!(
        page_value(
            &browser,
            "return document.querySelectorAll('#events img').length + ':' + (document.body.dataset.injected || '')"
        )
        .await,
        Value::String("0:".into())
    );

    // A killed node turns unhealthy.
    cluster.nodes[2].kill();
    wait_page(
        &browser,
        "n3 unhealthy",
        "return !!document.querySelector('[data-node=n3][data-health=unhealthy]') && \
         document.querySelectorAll('[data-node][data-health=healthy]').length === 2",
    )
    .await;

    let screenshot = browser.screenshot().await.unwrap();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &screenshot).unwrap();
    eprintln!("screenshot: {}", path.display());
    browser.close().await.unwrap();
}

/// Without a token the page asks for one instead of showing data, and a
/// wrong one is refused with the API's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_the_token() {
    let driver = ChromeDriver::start();
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::new(root.path(), "solo", Vec::new());
    node.start();
    tokio::task::block_in_place(|| wait_for("the node's API", || node.status()));
    let browser = driver.browser(1000, 800).await;
    browser.goto(&format!("http://{}/", node.api)).await.unwrap();
    wait_page(
        &browser,
        "the sign-in form",
        "return document.body.dataset.auth === 'required' && !!document.querySelector('#token')",
    )
    .await;
    type_into(&browser, "#token", "not-the-token").await;
    click(&browser, "#sign-in").await;
    wait_page(
        &browser,
        "the API's refusal",
        "return document.body.innerText.includes('wrong token')",
    )
    .await;
    assert_ne!(
        page_value(&browser, "return document.body.dataset.ready").await,
        Value::String("1".into()),
        "no data with a wrong token"
    );
    let token = std::fs::read_to_string(node.dir.join("token")).unwrap();
    browser
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    type_into(&browser, "#token", token.trim()).await;
    click(&browser, "#sign-in").await;
    wait_page(
        &browser,
        "its first render",
        "return document.body.dataset.ready === '1'",
    )
    .await;
    wait_page(
        &browser,
        "the node",
        "return !!document.querySelector('[data-node=solo][data-health=healthy]')",
    )
    .await;
    browser.close().await.unwrap();
}
