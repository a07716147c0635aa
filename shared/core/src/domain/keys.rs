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

/// RunPod volume: the folder all of this deployment's files live in (`VOLUME_ROOT`), such as
/// `gateway/prod/`. Other stacks, pods and people may share the volume; the janitor removes
/// only what lies under this folder, so each deployment needs a root of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRoot(String);

/// Why a `VOLUME_ROOT` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("volume root {0:?} must be 1 to 8 folder names of letters, digits, '.', '_' or '-', not '.' or '..', 200 bytes at most")]
pub struct InvalidVolumeRoot(pub String);

impl VolumeRoot {
    /// `gateway/prod`, `/gateway/prod/` and `gateway/prod/` are the same root. Only plain folder
    /// names are accepted: the root is part of every key a worker is told to read or write, and
    /// of every folder the janitor removes.
    pub fn new(root: &str) -> Result<Self, InvalidVolumeRoot> {
        let trimmed = root.trim().trim_matches('/');
        let valid = !trimmed.is_empty()
            && trimmed.len() <= 200
            && trimmed.split('/').count() <= 8
            && trimmed.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
        if !valid {
            return Err(InvalidVolumeRoot(root.to_owned()));
        }
        Ok(Self(format!("{trimmed}/")))
    }

    /// The root with its trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A job's input as the worker reads it, `{root}inputs/{job_id}/{file_name}`. Every part
    /// is the gateway's own (a job id it minted, a file name it chose).
    pub fn input(&self, job_id: &str, file_name: &str) -> String {
        format!("{}inputs/{job_id}/{file_name}", self.0)
    }

    /// Every input of a job, `{root}inputs/{job_id}/`.
    pub fn inputs(&self, job_id: &str) -> String {
        format!("{}inputs/{job_id}/", self.0)
    }

    /// The folder a job's outputs must land in, `{root}outputs/{job_id}/`.
    pub fn outputs(&self, job_id: &str) -> String {
        format!("{}outputs/{job_id}/", self.0)
    }

    /// The folder one dispatch attempt's run writes into, `{root}outputs/{job_id}/a{attempt}/`.
    pub fn run_outputs(&self, job_id: &str, attempt: u32) -> String {
        format!("{}outputs/{job_id}/a{attempt}/", self.0)
    }

    /// The folders holding one folder per job, named by the job's id: `{root}inputs/` and
    /// `{root}outputs/`.
    pub fn job_folders(&self) -> [String; 2] {
        [format!("{}inputs/", self.0), format!("{}outputs/", self.0)]
    }
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

/// Job table: the partition of the owner-and-status index a job is listed under,
/// `{owner}#{status}` (the public status name).
pub fn owner_status(owner: &str, status: &str) -> String {
    format!("{owner}#{status}")
}

/// Job table: a job's callback delivery log, `deliveries#{job_id}`.
pub fn delivery_log(job_id: &str) -> String {
    format!("deliveries#{job_id}")
}

/// Job table: a hold-back key's slots and line, `slots#{key}`.
pub fn slots_item(key: &str) -> String {
    format!("slots#{key}")
}

/// Job table: what an operator set as an owner's limits, `limits#{owner}`.
pub fn limits_item(owner: &str) -> String {
    format!("limits#{owner}")
}

/// Job table: an owner's submit bucket, `rate#{owner}`.
pub fn rate_item(owner: &str) -> String {
    format!("rate#{owner}")
}

/// Job table: a batch, `batch#{id}`.
pub fn batch_item(id: &str) -> String {
    format!("batch#{id}")
}

/// Job table: an owner's callback signing secrets (encrypted), `signing#{owner}`.
pub fn signing_keys(owner: &str) -> String {
    format!("signing#{owner}")
}

/// Job table: an owner's usage totals for one UTC day, `usage#{owner}#{day}`.
pub fn usage_item(owner: &str, day: &str) -> String {
    format!("usage#{owner}#{day}")
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
    }

    #[test]
    fn volume_keys_lie_under_the_deployment_root() {
        let root = VolumeRoot::new("gateway/prod").unwrap();
        assert_eq!(
            root.input("j", "input.jpg"),
            "gateway/prod/inputs/j/input.jpg"
        );
        assert_eq!(root.outputs("j"), "gateway/prod/outputs/j/");
        assert!(root.run_outputs("j", 2).starts_with(&root.outputs("j")));
        assert!(root.input("j", "a").starts_with(&root.inputs("j")));
        assert_eq!(
            root.job_folders(),
            ["gateway/prod/inputs/", "gateway/prod/outputs/"]
        );
    }

    #[test]
    fn a_volume_root_is_the_same_with_or_without_slashes() {
        assert_eq!(
            VolumeRoot::new("/gateway/prod/").unwrap(),
            VolumeRoot::new("gateway/prod").unwrap()
        );
        assert_eq!(VolumeRoot::new("gw").unwrap().as_str(), "gw/");
    }

    #[test]
    fn a_volume_root_is_plain_folder_names_only() {
        for bad in ["", "/", "a//b", "../x", "a/./b", "a b", "a%2e", "a\\b", "ä"] {
            assert!(VolumeRoot::new(bad).is_err(), "{bad:?}");
        }
        assert!(VolumeRoot::new(&"a".repeat(201)).is_err());
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
