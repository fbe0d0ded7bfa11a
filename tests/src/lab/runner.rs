//! The runner image's program in lab pods (`arcfed-lab runner`): an ephemeral runner that takes
//! ARC's JIT config, comes online at the emulator, runs its one job there and exits 0, so ARC's
//! EphemeralRunner controller sees what it sees from a real runner pod.

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use std::time::Duration;

/// ARC passes the JIT config to the runner container in this variable.
pub const JIT_ENV: &str = "ACTIONS_RUNNER_INPUT_JITCONFIG";
/// The emulator's base URL (`http://host:port`), added by the kubelet stand-in.
pub const EMULATOR_ENV: &str = "ARCFED_LAB_EMULATOR";

/// The runner name inside an emulator JIT config (base64 of `{"runnerName": …}`).
pub fn runner_name(encoded: &str) -> anyhow::Result<String> {
    let raw = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).context("JIT config is not base64")?;
    let v: serde_json::Value = serde_json::from_slice(&raw).context("JIT config is not JSON")?;
    v["runnerName"].as_str().map(str::to_string).ok_or_else(|| anyhow!("JIT config has no runnerName"))
}

pub async fn run() -> anyhow::Result<()> {
    let jit = std::env::var(JIT_ENV).with_context(|| format!("${JIT_ENV} is not set"))?;
    let base = std::env::var(EMULATOR_ENV).with_context(|| format!("${EMULATOR_ENV} is not set"))?;
    let name = runner_name(&jit)?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let url = format!("{}/_emulator/runners/{name}", base.trim_end_matches('/'));
    eprintln!("runner {name}: online at {base}");
    let mut tries = 0;
    loop {
        match http.post(format!("{url}/online")).json(&serde_json::json!({"auto": true})).send().await {
            Ok(r) if r.status().is_success() => break,
            Ok(r) if tries > 20 => bail!("runner {name}: online answered {}", r.status()),
            Err(e) if tries > 20 => bail!("runner {name}: online failed: {e}"),
            _ => tries += 1,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(r) = http.get(&url).send().await else { continue };
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            bail!("runner {name}: the emulator no longer knows this runner");
        }
        let Ok(state) = r.json::<serde_json::Value>().await else { continue };
        if state["finished"].as_bool() == Some(true) {
            eprintln!("runner {name}: job done");
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_runner_name() {
        let enc =
            base64::engine::general_purpose::STANDARD.encode(r#"{"runnerId":3,"runnerName":"r-1","scaleSetId":1}"#);
        assert_eq!(runner_name(&enc).unwrap(), "r-1");
        assert!(runner_name("!!").is_err());
        let enc = base64::engine::general_purpose::STANDARD.encode(r#"{"runnerId":3}"#);
        assert!(runner_name(&enc).is_err());
    }
}
