//! The built-in worker running the restore workflow's nodes on real images.

use runpod_emulator::Faults;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn run_completes_with_a_png_scaled_to_the_requested_megapixels() {
    let h = start().await;
    write_jpeg(&h.emu.volume_dir, "inputs/job-a/input.jpg", 640, 480);
    let id = h
        .run(restore_job(
            "inputs/job-a/input.jpg",
            0.5,
            "outputs/job-a/restored",
        ))
        .await;
    let body = h.wait_status(&id, "COMPLETED").await;

    let output = &body["output"];
    assert_eq!(output["file_count"], 1);
    assert!(uuid::Uuid::parse_str(output["prompt_id"].as_str().unwrap()).is_ok());
    assert_eq!(
        output["files"],
        json!(["/runpod-volume/outputs/job-a/restored_00001_.png"])
    );

    let png = h.emu.volume_dir.join("outputs/job-a/restored_00001_.png");
    let image = image::open(&png).expect("output PNG decodes");
    let pixels = f64::from(image.width()) * f64::from(image.height());
    // ComfyUI counts a megapixel as 1024*1024.
    let wanted = 0.5 * 1024.0 * 1024.0;
    assert!(
        (pixels / wanted - 1.0).abs() < 0.01,
        "{}x{}",
        image.width(),
        image.height()
    );
    let aspect = f64::from(image.width()) / f64::from(image.height());
    assert!((aspect - 640.0 / 480.0).abs() < 0.01);
    assert!(body["executionTime"].is_u64() && body["delayTime"].is_u64());
}

#[tokio::test]
async fn saving_twice_with_one_prefix_counts_up_like_comfyui() {
    let h = start().await;
    write_jpeg(&h.emu.volume_dir, "inputs/in.jpg", 32, 32);
    let job = restore_job("inputs/in.jpg", 0.01, "outputs/same/restored");
    let first = h.run(job.clone()).await;
    h.wait_status(&first, "COMPLETED").await;
    let second = h.run(job).await;
    let body = h.wait_status(&second, "COMPLETED").await;
    assert_eq!(
        body["output"]["files"],
        json!(["/runpod-volume/outputs/same/restored_00002_.png"])
    );
}

#[tokio::test]
async fn missing_input_file_fails_the_job_with_a_clear_error() {
    let h = start().await;
    let id = h
        .run(restore_job(
            "inputs/nope/input.jpg",
            1.0,
            "outputs/nope/restored",
        ))
        .await;
    let body = h.wait_status(&id, "FAILED").await;
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("LoadImage") && error.contains("inputs/nope/input.jpg"),
        "{error}"
    );
}

#[tokio::test]
async fn input_path_escaping_the_volume_fails_the_job() {
    let h = start().await;
    for path in ["../etc/passwd", "/etc/passwd"] {
        let id = h.run(restore_job(path, 1.0, "outputs/x/restored")).await;
        let body = h.wait_status(&id, "FAILED").await;
        assert!(
            body["error"].as_str().unwrap().contains("LoadImage"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn undecodable_input_fails_the_job() {
    let h = start().await;
    let path = h.emu.volume_dir.join("inputs/bad.jpg");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"not an image").unwrap();
    let id = h
        .run(restore_job("inputs/bad.jpg", 1.0, "outputs/bad/restored"))
        .await;
    let body = h.wait_status(&id, "FAILED").await;
    assert!(
        body["error"].as_str().unwrap().contains("cannot load"),
        "{body}"
    );
}

#[tokio::test]
async fn dangling_link_fails_the_job() {
    let h = start().await;
    let workflow = json!({
        "60": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "outputs/x/r"}}
    });
    let id = h.run(json!({"input": {"workflow_api": workflow}})).await;
    let body = h.wait_status(&id, "FAILED").await;
    assert!(
        body["error"].as_str().unwrap().contains("missing node 8"),
        "{body}"
    );
}

#[tokio::test]
async fn missing_workflow_fails_the_job() {
    let h = start().await;
    let id = h.run(json!({"input": {"images": []}})).await;
    let body = h.wait_status(&id, "FAILED").await;
    assert!(
        body["error"].as_str().unwrap().contains("workflow_api"),
        "{body}"
    );
}

#[tokio::test]
async fn worker_fail_message_fails_every_job_with_that_error() {
    let h = start().await;
    h.emu.set_faults(Faults {
        worker_fail_message: Some("handler exploded".into()),
        ..Default::default()
    });
    let id = h.run(trivial_job(&h.dir)).await;
    let body = h.wait_status(&id, "FAILED").await;
    assert_eq!(body["error"], "handler exploded");
}

#[tokio::test]
async fn worker_output_override_is_returned_verbatim() {
    let h = start().await;
    let hostile = json!({"prompt_id": "x", "files": ["/runpod-volume/../etc/passwd", "/elsewhere/a.png"], "file_count": 2});
    h.emu.set_faults(Faults {
        worker_output_override: Some(hostile.clone()),
        ..Default::default()
    });
    let id = h.run(trivial_job(&h.dir)).await;
    let body = h.wait_status(&id, "COMPLETED").await;
    assert_eq!(body["output"], hostile);
}

#[tokio::test]
async fn a_worker_comfyui_input_gets_inline_base64_images_and_leaves_the_volume_alone() {
    use base64::Engine as _;
    let h = start().await;
    write_jpeg(&h.emu.volume_dir, "inputs/job-c/input.jpg", 320, 240);
    let workflow = restore_workflow("inputs/job-c/input.jpg", 0.05, "outputs/job-c/restored");
    let id = h.run(json!({"input": {"workflow": workflow}})).await;
    let body = h.wait_status(&id, "COMPLETED").await;
    let images = body["output"]["images"].as_array().expect("images");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["filename"], "restored_00001_.png");
    assert_eq!(images[0]["type"], "base64");
    let png = base64::engine::general_purpose::STANDARD
        .decode(images[0]["data"].as_str().unwrap())
        .unwrap();
    let image = image::load_from_memory(&png).expect("a PNG");
    let pixels = f64::from(image.width() * image.height());
    assert!((pixels / (0.05 * 1024.0 * 1024.0) - 1.0).abs() < 0.02);
    assert!(!h.emu.volume_dir.join("outputs").exists());
}
