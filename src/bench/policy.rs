//! `cqrsd bench policy`: what a policy costs. Orders are placed on the shop
//! of `examples/shop.toml` by closed-loop clients, once with its policies
//! cut out (the limit: the write side alone) and once with them; with them,
//! every order makes the policies send three more commands (reserve,
//! request, confirm), and the scenario waits until the chain has settled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::load::{Stats, closed_loop};
use super::target::Http;
use super::{Options, Report, Scenario};
use crate::config::Config;

const SHOP: &str = include_str!("../../examples/shop.toml");
/// Items the orders are spread over, so reservations of different orders
/// go to different aggregates (a policy sends commands to distinct
/// aggregates together).
const ITEMS: [&str; 8] = [
    r#"{"item":"i0","qty":1,"customer":"c"}"#,
    r#"{"item":"i1","qty":1,"customer":"c"}"#,
    r#"{"item":"i2","qty":1,"customer":"c"}"#,
    r#"{"item":"i3","qty":1,"customer":"c"}"#,
    r#"{"item":"i4","qty":1,"customer":"c"}"#,
    r#"{"item":"i5","qty":1,"customer":"c"}"#,
    r#"{"item":"i6","qty":1,"customer":"c"}"#,
    r#"{"item":"i7","qty":1,"customer":"c"}"#,
];
const RESTOCK_BODY: &str = r#"{"qty":1000000000}"#;
const WAIT_BOUND: Duration = Duration::from_secs(1800);
const POLICIES: [&str; 3] = ["reserve_stock", "request_payment", "confirm_order"];

/// The shop without its policies (everything between the policies' and the
/// views' markers).
fn shop_without_policies() -> anyhow::Result<String> {
    let start = SHOP
        .find("# --- policies ---")
        .context("no policies marker")?;
    let end = SHOP.find("# --- views ---").context("no views marker")?;
    Ok(format!("{}{}", &SHOP[..start], &SHOP[end..]))
}

async fn place_orders(http: &Http, prefix: &str, clients: usize, duration: Duration) -> Stats {
    let http = http.clone();
    let prefix = Arc::new(prefix.to_owned());
    closed_loop(clients, duration, move |c, s| {
        let http = http.clone();
        let path = format!("/commands/order/{prefix}-{c}-{s}/place");
        let body = ITEMS[(c + s as usize) % ITEMS.len()];
        async move { matches!(http.post(&path, body).await, Ok((200, _))) }
    })
    .await
}

async fn restock(http: &Http) -> anyhow::Result<()> {
    for i in 0..ITEMS.len() {
        let (status, _) = http
            .post(&format!("/commands/item/i{i}/restock"), RESTOCK_BODY)
            .await?;
        anyhow::ensure!(status == 200, "restock: {status}");
    }
    Ok(())
}

/// Waits until no policy lags; returns when that was first seen.
async fn wait_settled(http: &Http) -> anyhow::Result<Instant> {
    let started = Instant::now();
    while started.elapsed() < WAIT_BOUND {
        let report = http.get_json("/admin/projections").await?;
        let lags: Vec<u64> = POLICIES
            .iter()
            .map(|name| {
                report["projections"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["name"] == *name)
                    .flat_map(|p| p["partitions"].as_array().into_iter().flatten())
                    .map(|part| part["lag"].as_u64().unwrap_or(u64::MAX))
                    .sum()
            })
            .collect();
        if lags.iter().all(|lag| *lag == 0) {
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the policies did not settle within {WAIT_BOUND:?}")
}

pub(super) fn run(options: &Options, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Report> {
    if options.url.is_some() {
        return Ok(Report::skipped(
            Scenario::Policy,
            "needs the shop domain in a daemon of its own: run without --url",
        ));
    }
    let clients = options.clients.max(1);
    let duration = options.duration;
    let domains = tempfile::tempdir()?;
    let with = domains.path().join("shop.toml");
    let without = domains.path().join("shop-without-policies.toml");
    std::fs::write(&with, SHOP)?;
    std::fs::write(&without, shop_without_policies()?)?;
    let use_domain =
        |path: std::path::PathBuf| move |config: &mut Config| config.domain.path = Some(path);

    eprintln!("policy: orders without policies ({clients} clients, {duration:?})");
    let setup = super::scenarios::Setup::start(options, use_domain(without))?;
    let alone = runtime.block_on(async {
        restock(&setup.http).await?;
        anyhow::Ok(place_orders(&setup.http, &setup.prefix, clients, duration).await)
    })?;
    setup.stop()?;

    eprintln!("policy: orders with the three policies, then until the chain settles");
    let setup = super::scenarios::Setup::start(options, use_domain(with))?;
    let (with_policies, drain) = runtime.block_on(async {
        restock(&setup.http).await?;
        let started = Instant::now();
        let placed = place_orders(&setup.http, &setup.prefix, clients, duration).await;
        let load_end = Instant::now();
        let settled = wait_settled(&setup.http).await?;
        anyhow::Ok((placed, (settled - started, settled - load_end)))
    })?;
    let (chain, after_load) = drain;
    let orders = with_policies.ok as f64;
    let chained = orders / chain.as_secs_f64().max(f64::MIN_POSITIVE);
    // The latencies are the clients' placing orders beside the policies; the
    // throughput is the chain's.
    let mut report =
        Report::new(Scenario::Policy, "orders/s through the chain").with_stats(&with_policies);
    report.throughput = chained;
    report = report.with_limit("orders/s, no policies", alone.throughput());
    report.set("policy_commands_per_s", 3.0 * chained);
    report.set("orders_per_s_with_policies", with_policies.throughput());
    report.set("orders_p99_ms_with_policies", with_policies.p99_ms());
    report.set("orders_p99_ms_without", alone.p99_ms());
    report.set("drain_after_load_s", after_load.as_secs_f64());
    report.set("clients", clients as u64);
    setup.stop()?;
    Ok(report)
}
