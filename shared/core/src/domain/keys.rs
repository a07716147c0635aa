//! Every key the gateway writes, in one place: object keys in the uploads and results buckets
//! and on the RunPod volume, and the partition keys of the job table. A key's shape decides who
//! can read what (results are grouped by owner, idempotency keys are per owner), so changing
//! one is a data migration, not a refactoring.

/// Uploads bucket: an inline input image, `inputs/{owner}/{job_id}/input.{extension}`.
pub fn inline_input(owner: &str, job_id: &str, extension: &str) -> String {
    format!("inputs/{owner}/{job_id}/input.{extension}")
}

/// Uploads bucket: a client's upload pinned as a job's input, `inputs/{owner}/{job_id}/input`:
/// the copy that was checked, out of reach of the upload URL.
pub fn pinned_upload(owner: &str, job_id: &str) -> String {
    format!("inputs/{owner}/{job_id}/input")
}

/// Uploads bucket: every input object of a job, `inputs/{owner}/{job_id}/`.
pub fn job_inputs(owner: &str, job_id: &str) -> String {
    format!("inputs/{owner}/{job_id}/")
}

/// Uploads bucket: a client's presigned upload, `uploads/{owner}/{upload_id}`.
pub fn upload(owner: &str, upload_id: &str) -> String {
    format!("uploads/{owner}/{upload_id}")
}

/// Results bucket: one output of a job, `results/{owner}/{job_id}/{attempt}/{file_name}`.
/// Each finalize attempt writes into a folder of its own ([`finalize_attempt`]), so an attempt
/// that cleans up after itself can never remove what a later attempt stored.
pub fn result(owner: &str, job_id: &str, attempt: &str, file_name: &str) -> String {
    format!("results/{owner}/{job_id}/{attempt}/{file_name}")
}

/// The folder of one finalize attempt: from the write that gave it the finalize lease.
pub fn finalize_attempt(lease_write: u64) -> String {
    format!("f{lease_write:016x}")
}

/// Results bucket: everything stored for a job, by any attempt.
pub fn results_of(owner: &str, job_id: &str) -> String {
    format!("results/{owner}/{job_id}/")
}

/// Results bucket: the confirmed report of a job's completed run, kept for the finalize function
/// (RunPod keeps it for only 30 minutes), `results/{owner}/{job_id}/report-{digest}.json`. The
/// digest of the run id keeps RunPod's wording of it out of the key, and names one key per run:
/// a hand-off repeated for the same run writes the same object again. It lies in the job's
/// results folder, so the job's clean-up removes it with every other copy no output names.
pub fn report(owner: &str, job_id: &str, run: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(&Sha256::digest(run.as_bytes())[..8]);
    format!("results/{owner}/{job_id}/report-{digest}.json")
}

/// RunPod volume: a job's input as the worker reads it, `inputs/{job_id}/{file_name}`. Both
/// parts are the gateway's own (a job id it minted, a file name it chose).
pub fn volume_input(job_id: &str, file_name: &str) -> String {
    format!("inputs/{job_id}/{file_name}")
}

/// RunPod volume: the folder a job's outputs must land in, `outputs/{job_id}/`.
/// RunPod volume: every input of a job, `inputs/{job_id}/`.
pub fn volume_inputs(job_id: &str) -> String {
    format!("inputs/{job_id}/")
}

pub fn volume_outputs(job_id: &str) -> String {
    format!("outputs/{job_id}/")
}

/// RunPod volume: the folder one dispatch attempt's run writes into,
/// `outputs/{job_id}/a{attempt}/`, inside the job's folder.
pub fn run_outputs(job_id: &str, attempt: u32) -> String {
    format!("outputs/{job_id}/a{attempt}/")
}

/// Job table: the partition key of a job item is its id.
pub fn job_item(job_id: &str) -> String {
    job_id.to_string()
}

/// Job table: the item that reserves an owner's idempotency key, `idem#{owner}#{key}`. Keys
/// never contain `#` (the API refuses them), so two owners' keys cannot collide.
pub fn idempotency_item(owner: &str, key: &str) -> String {
    format!("idem#{owner}#{key}")
}

/// How many partition values the sweeper index is spread over, so that no single hot key takes
/// all writes of jobs in flight; a sweep queries each.
pub const SWEEP_SHARDS: u32 = 4;

/// Job table: the sweeper-index partition of shard `shard`, `s{shard}`.
pub fn sweep_shard(shard: u32) -> String {
    format!("s{shard}")
}

/// The sweeper-index partition a job lives in: stable for the job, spread over the shards.
pub fn sweep_shard_of(job_id: &str) -> String {
    let shard = job_id
        .bytes()
        .fold(0u32, |acc, b| acc.wrapping_mul(31).wrapping_add(b as u32))
        % SWEEP_SHARDS;
    sweep_shard(shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_keep_each_owner_and_job_in_its_own_folder() {
        assert_eq!(
            inline_input("alice", "j", "png"),
            "inputs/alice/j/input.png"
        );
        assert_eq!(upload("alice", "u"), "uploads/alice/u");
        assert!(inline_input("alice", "j", "png").starts_with(&job_inputs("alice", "j")));
        assert!(pinned_upload("alice", "j").starts_with(&job_inputs("alice", "j")));
        assert_eq!(
            result("alice", "j", &finalize_attempt(0xab), "a.png"),
            "results/alice/j/f00000000000000ab/a.png"
        );
        assert!(result("alice", "j", "f1", "a.png").starts_with(&results_of("alice", "j")));
        assert!(report("alice", "j", "../../x").starts_with(&results_of("alice", "j")));
        assert!(!report("alice", "j", "../../x").contains(".."));
        assert_eq!(report("alice", "j", "r1"), report("alice", "j", "r1"));
        assert_ne!(report("alice", "j", "r1"), report("alice", "j", "r2"));
        assert_eq!(volume_input("j", "input.jpg"), "inputs/j/input.jpg");
        assert_eq!(volume_outputs("j"), "outputs/j/");
    }

    #[test]
    fn idempotency_items_are_per_owner() {
        assert_eq!(idempotency_item("alice", "k1"), "idem#alice#k1");
        assert_ne!(
            idempotency_item("alice", "k1"),
            idempotency_item("bob", "k1")
        );
    }

    #[test]
    fn sweep_shards_spread_and_stay_stable() {
        let a = sweep_shard_of("0190a3b4-0000-7000-8000-000000000001");
        assert_eq!(a, sweep_shard_of("0190a3b4-0000-7000-8000-000000000001"));
        let shards: std::collections::BTreeSet<String> = (0..64)
            .map(|i| sweep_shard_of(&format!("0190a3b4-0000-7000-8000-{i:012}")))
            .collect();
        assert_eq!(shards.len(), SWEEP_SHARDS as usize);
    }
}
