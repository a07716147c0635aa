//! A client nobody here wrote against the ComfyUI emulator: `comfy-api-simplified` (PyPI,
//! pinned in local/python/requirements.txt) runs tests/python/comfy_client_check.py, which
//! uploads, queues the restore graph, polls history, fetches the output, reads the queue,
//! interrupts one prompt and deletes another. If the emulator's answers drift from what a real
//! ComfyUI client expects, this fails.
use std::time::Duration;

use comfyui_emulator::{spawn, ComfyConfig};
use gateway_tests::run_python;

#[tokio::test]
async fn a_third_party_comfyui_client_runs_the_restore_graph_against_the_emulator() {
    let root = std::env::temp_dir().join(format!("comfyui-client-check-{}", uuid::Uuid::new_v4()));
    let emulator = spawn(
        ComfyConfig::new(root.join("input"), root.join("output")),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("emulator starts");
    let env = [("COMFYUI_URL", emulator.url.clone())];
    let (ok, stdout, stderr) =
        run_python("comfy_client_check.py", &env, Duration::from_secs(120)).await;
    emulator.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
    assert!(ok, "the client check failed:\n{stdout}\n{stderr}");
}
