//! Keys on the network volume and in the results bucket, and the mapping from the absolute paths
//! a worker returns to volume keys.
//!
//! The handler's output is untrusted input: a compromised or buggy worker must not be able to make
//! the gateway copy (and hand a client) any file on the volume other than its own job's outputs.
//! So [`VolumeLayout::output_key`] accepts only plain, canonical paths and rejects everything
//! else rather than trying to normalise it.

/// S3's own limit on a key.
pub const MAX_KEY_BYTES: usize = 1024;
/// The usual filesystem limit (NAME_MAX) on the volume the worker writes to.
pub const MAX_FILE_NAME_BYTES: usize = 255;

use super::keys::VolumeRoot;

/// Why a worker's path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is not under a volume mount point")]
    NotUnderMount,
    #[error("path is outside this job's output folder")]
    OutsideAllowedPrefix,
    #[error("path has a '.' or '..' segment")]
    Traversal,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path names a folder, not a file")]
    MissingFileName,
    #[error("path has a control character, a backslash or a '%'")]
    InvalidCharacter,
    #[error("key is longer than {MAX_KEY_BYTES} bytes")]
    TooLong,
    #[error("file name is longer than {MAX_FILE_NAME_BYTES} bytes")]
    FileNameTooLong,
}

/// Where the network volume is mounted on workers (`/runpod-volume` on serverless, `/workspace`
/// on pods; a key is the path below the mount point), and the folder on it that is this
/// deployment's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeLayout {
    mount_prefixes: Vec<String>,
    root: VolumeRoot,
}

impl VolumeLayout {
    /// Trailing slashes are dropped. A prefix that is empty after that (`""`, `"/"`) is ignored:
    /// it would make every absolute path a volume path.
    pub fn new(mount_prefixes: Vec<String>, root: VolumeRoot) -> Self {
        let mut mount_prefixes: Vec<String> = mount_prefixes
            .into_iter()
            .map(|p| p.trim_end_matches('/').to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        // Longest first, so a mount nested in another strips the whole mount point.
        mount_prefixes.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        mount_prefixes.dedup();
        Self {
            mount_prefixes,
            root,
        }
    }

    /// This deployment's folder on the volume, which every key it uses lies under.
    pub fn root(&self) -> &VolumeRoot {
        &self.root
    }

    /// The mount points, normalised, longest first.
    pub fn mount_prefixes(&self) -> &[String] {
        &self.mount_prefixes
    }

    /// Maps a path the worker returned to a volume key, if the path is canonical, lies under a
    /// mount point and inside `allowed_prefix`: `"/runpod-volume/outputs/<job>/a.png"` with
    /// `allowed_prefix = "outputs/<job>/"` gives `"outputs/<job>/a.png"`.
    ///
    /// `allowed_prefix` is treated as a folder whether or not it ends in `/`, so
    /// `"outputs/job1"` never admits `"outputs/job10/…"`. An empty one admits nothing.
    pub fn output_key(
        &self,
        returned_path: &str,
        allowed_prefix: &str,
    ) -> Result<String, PathError> {
        if returned_path.is_empty() {
            return Err(PathError::Empty);
        }
        // `%` is refused outright rather than only where it decodes to '.', '/' or '\': the key
        // goes to an S3 client that percent-encodes it again, and some layer between here and a
        // filesystem may decode once or twice. No name the handler writes needs a literal '%'.
        if returned_path
            .chars()
            .any(|c| c.is_control() || c == '\\' || c == '%')
        {
            return Err(PathError::InvalidCharacter);
        }
        let key = self
            .mount_prefixes
            .iter()
            .find_map(|mount| {
                // Matching on the mount plus '/' keeps "/runpod-volume-evil" and "/runpod-volumex"
                // out.
                returned_path
                    .strip_prefix(mount.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
            })
            .ok_or(PathError::NotUnderMount)?;
        if key.len() > MAX_KEY_BYTES {
            return Err(PathError::TooLong);
        }
        if key.is_empty() || key.ends_with('/') {
            return Err(PathError::MissingFileName);
        }
        for segment in key.split('/') {
            match segment {
                "" => return Err(PathError::EmptySegment),
                "." | ".." => return Err(PathError::Traversal),
                _ => {}
            }
        }
        if file_name(key).len() > MAX_FILE_NAME_BYTES {
            return Err(PathError::FileNameTooLong);
        }
        let folder = allowed_prefix.trim_end_matches('/');
        if folder.is_empty() {
            return Err(PathError::OutsideAllowedPrefix);
        }
        if key == folder {
            return Err(PathError::MissingFileName);
        }
        match key.strip_prefix(folder) {
            // Segments are non-empty and the key has no trailing '/', so something follows.
            Some(rest) if rest.starts_with('/') => Ok(key.to_owned()),
            _ => Err(PathError::OutsideAllowedPrefix),
        }
    }
}

/// The part of a key after its last `/` (the whole key if it has none; empty if it ends in `/`).
pub fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

    fn root() -> VolumeRoot {
        VolumeRoot::new("gw").unwrap()
    }

    fn layout() -> VolumeLayout {
        VolumeLayout::new(vec!["/runpod-volume/".into(), "/workspace".into()], root())
    }

    fn map(path: &str) -> Result<String, PathError> {
        layout().output_key(path, &root().outputs(JOB))
    }

    #[test]
    fn maps_serverless_mount_to_key() {
        assert_eq!(
            map(&format!(
                "/runpod-volume/gw/outputs/{JOB}/restored_00001_.png"
            )),
            Ok(format!("gw/outputs/{JOB}/restored_00001_.png"))
        );
    }

    #[test]
    fn maps_pod_mount_to_key() {
        assert_eq!(
            map(&format!("/workspace/gw/outputs/{JOB}/a.png")),
            Ok(format!("gw/outputs/{JOB}/a.png"))
        );
    }

    #[test]
    fn accepts_nested_folders_under_the_allowed_prefix() {
        assert_eq!(
            map(&format!("/workspace/gw/outputs/{JOB}/sub/a.png")),
            Ok(format!("gw/outputs/{JOB}/sub/a.png"))
        );
    }

    #[test]
    fn new_normalises_trailing_slashes_and_drops_root() {
        let l = VolumeLayout::new(vec!["/workspace///".into(), "/".into(), "".into()], root());
        assert_eq!(l.mount_prefixes(), ["/workspace"]);
    }

    #[test]
    fn new_puts_nested_mounts_first() {
        let l = VolumeLayout::new(vec!["/mnt".into(), "/mnt/vol".into()], root());
        assert_eq!(
            l.output_key("/mnt/vol/outputs/j/a.png", "outputs/j/"),
            Ok("outputs/j/a.png".into())
        );
    }

    #[test]
    fn rejects_empty_path() {
        assert_eq!(map(""), Err(PathError::Empty));
    }

    #[test]
    fn rejects_path_outside_every_mount() {
        assert_eq!(
            map(&format!("/tmp/gw/outputs/{JOB}/a.png")),
            Err(PathError::NotUnderMount)
        );
        assert_eq!(
            map(&format!("gw/outputs/{JOB}/a.png")),
            Err(PathError::NotUnderMount)
        );
    }

    #[test]
    fn rejects_mount_prefix_tricks() {
        for mount in ["/runpod-volume-evil", "/runpod-volumex", "/workspace2"] {
            assert_eq!(
                map(&format!("{mount}/gw/outputs/{JOB}/a.png")),
                Err(PathError::NotUnderMount),
                "{mount}"
            );
        }
    }

    #[test]
    fn rejects_bare_mount() {
        assert_eq!(map("/runpod-volume"), Err(PathError::NotUnderMount));
        assert_eq!(map("/runpod-volume/"), Err(PathError::MissingFileName));
    }

    #[test]
    fn rejects_dot_dot_segment() {
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}/../other/a.png")),
            Err(PathError::Traversal)
        );
        assert_eq!(
            map("/runpod-volume/../etc/passwd"),
            Err(PathError::Traversal)
        );
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}/..")),
            Err(PathError::Traversal)
        );
    }

    #[test]
    fn rejects_dot_segment() {
        assert_eq!(
            map(&format!("/runpod-volume/outputs/./{JOB}/a.png")),
            Err(PathError::Traversal)
        );
    }

    #[test]
    fn accepts_dots_inside_names() {
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}/..a.png")),
            Ok(format!("gw/outputs/{JOB}/..a.png"))
        );
    }

    #[test]
    fn rejects_percent_encoding() {
        for p in ["%2e%2e", "%2E%2E", "a%2fb.png", "a%5cb.png", "100%.png"] {
            assert_eq!(
                map(&format!("/runpod-volume/gw/outputs/{JOB}/{p}")),
                Err(PathError::InvalidCharacter),
                "{p}"
            );
        }
    }

    #[test]
    fn rejects_backslash() {
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}/..\\..\\a.png")),
            Err(PathError::InvalidCharacter)
        );
    }

    #[test]
    fn rejects_empty_segment() {
        assert_eq!(
            map(&format!("/runpod-volume/outputs//{JOB}/a.png")),
            Err(PathError::EmptySegment)
        );
        assert_eq!(
            map(&format!("/runpod-volume//gw/outputs/{JOB}/a.png")),
            Err(PathError::EmptySegment)
        );
    }

    #[test]
    fn rejects_nul_and_control_characters() {
        for c in ['\0', '\n', '\r', '\t', '\x1b', '\x7f', '\u{85}'] {
            assert_eq!(
                map(&format!("/runpod-volume/gw/outputs/{JOB}/a{c}.png")),
                Err(PathError::InvalidCharacter),
                "{c:?}"
            );
        }
    }

    #[test]
    fn rejects_key_over_1024_bytes() {
        let dirs = "d/".repeat(600);
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}/{dirs}a.png")),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn accepts_key_of_exactly_1024_bytes() {
        let head = format!("gw/outputs/{JOB}/");
        let name = "a".repeat(200);
        let dirs = "d/".repeat((MAX_KEY_BYTES - head.len() - name.len()) / 2);
        let mut key = format!("{head}{dirs}{name}");
        while key.len() < MAX_KEY_BYTES {
            key.push('a');
        }
        assert_eq!(key.len(), MAX_KEY_BYTES);
        assert_eq!(map(&format!("/runpod-volume/{key}")), Ok(key));
    }

    #[test]
    fn rejects_file_name_over_255_bytes() {
        let name = "é".repeat(128); // 256 bytes, 128 characters
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}/{name}")),
            Err(PathError::FileNameTooLong)
        );
        let name = "a".repeat(MAX_FILE_NAME_BYTES);
        assert!(map(&format!("/runpod-volume/gw/outputs/{JOB}/{name}")).is_ok());
    }

    #[test]
    fn rejects_bare_allowed_prefix() {
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}/")),
            Err(PathError::MissingFileName)
        );
        assert_eq!(
            map(&format!("/runpod-volume/gw/outputs/{JOB}")),
            Err(PathError::MissingFileName)
        );
    }

    #[test]
    fn rejects_another_jobs_output() {
        assert_eq!(
            map("/runpod-volume/outputs/other-job/a.png"),
            Err(PathError::OutsideAllowedPrefix)
        );
        assert_eq!(
            map(&format!("/runpod-volume/inputs/{JOB}/input.jpg")),
            Err(PathError::OutsideAllowedPrefix)
        );
    }

    #[test]
    fn allowed_prefix_is_a_folder_not_a_string_prefix() {
        let l = layout();
        assert_eq!(
            l.output_key("/workspace/outputs/job10/a.png", "outputs/job1"),
            Err(PathError::OutsideAllowedPrefix)
        );
        assert_eq!(
            l.output_key("/workspace/outputs/job1/a.png", "outputs/job1"),
            Ok("outputs/job1/a.png".into())
        );
    }

    #[test]
    fn empty_allowed_prefix_admits_nothing() {
        assert_eq!(
            layout().output_key("/workspace/outputs/j/a.png", ""),
            Err(PathError::OutsideAllowedPrefix)
        );
    }

    #[test]
    fn file_name_is_the_last_segment() {
        assert_eq!(file_name("outputs/j/a.png"), "a.png");
        assert_eq!(file_name("a.png"), "a.png");
        assert_eq!(file_name("outputs/j/"), "");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(".".to_owned()),
                Just("..".to_owned()),
                Just("".to_owned()),
                Just("%2e%2e".to_owned()),
                Just("j".to_owned()),
                Just("outputs".to_owned()),
                "[a-z0-9._-]{1,8}",
                "\\PC{0,4}",
            ]
        }

        fn path() -> impl Strategy<Value = String> {
            (
                prop_oneof![
                    Just("/runpod-volume"),
                    Just("/workspace"),
                    Just("/runpod-volumex"),
                    Just(""),
                ],
                proptest::collection::vec(segment(), 0..6),
            )
                .prop_map(|(mount, segs)| format!("{mount}/{}", segs.join("/")))
        }

        proptest! {
            #[test]
            fn accepted_keys_stay_inside_the_allowed_prefix(p in path()) {
                if let Ok(key) = layout().output_key(&p, "outputs/j/") {
                    prop_assert!(key.starts_with("outputs/j/"));
                    prop_assert!(key.len() > "outputs/j/".len());
                    prop_assert!(!key.split('/').any(|s| s == ".." || s == "." || s.is_empty()));
                    prop_assert!(!key.contains(['\\', '%', '\0']));
                    prop_assert!(p.ends_with(&key));
                }
            }

            #[test]
            fn plain_names_under_the_prefix_round_trip(name in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}") {
                prop_assume!(name != "." && name != "..");
                let path = format!("/runpod-volume/outputs/j/{name}");
                prop_assert_eq!(
                    layout().output_key(&path, "outputs/j/"),
                    Ok(format!("outputs/j/{name}"))
                );
            }

            #[test]
            fn output_key_never_panics(p in "\\PC{0,64}|/runpod-volume/\\PC{0,64}") {
                let _ = layout().output_key(&p, "outputs/j/");
            }
        }
    }
}
