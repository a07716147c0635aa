//! ListObjects(V2) over the volume directory, as RunPod's filesystem-backed listing answers:
//! keys in UTF-8 byte order, empty directories included (a switch), the staging folder hidden
//! (a switch), and pages read lazily so a page near the start of a big volume costs one
//! directory read per level rather than a walk of everything.
//!
//! s3s-fs's own listing walks the whole bucket for every page, lists no directories and would
//! show the staging folder, hence this module.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::uploads::STAGING_DIR;

/// What one listing request asks for.
#[derive(Debug, Clone)]
pub(crate) struct ListQuery {
    pub prefix: String,
    pub delimiter: Option<String>,
    /// Only keys (and common prefixes) strictly after this one.
    pub after: Option<String>,
    pub max_keys: usize,
    pub empty_folders: bool,
    pub staging_folder: bool,
}

/// A file, or an empty directory as `dir/` with size 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

#[derive(Debug, Default)]
pub(crate) struct Page {
    pub objects: Vec<Listed>,
    pub prefixes: Vec<String>,
    pub truncated: bool,
    /// The last key or common prefix on the page: where the next page starts after.
    pub last: Option<String>,
}

impl Page {
    pub(crate) fn len(&self) -> usize {
        self.objects.len() + self.prefixes.len()
    }
}

pub(crate) fn list(volume: &Path, query: &ListQuery) -> io::Result<Page> {
    let mut page = Page::default();
    if query.max_keys == 0 {
        return Ok(page);
    }
    let mut walk = Walk::new(volume, query);
    while let Some(item) = walk.next()? {
        if !item.key.starts_with(&query.prefix) {
            continue;
        }
        let rolled_up = query
            .delimiter
            .as_deref()
            .filter(|d| !d.is_empty())
            .and_then(|d| {
                let rest = &item.key[query.prefix.len()..];
                rest.find(d)
                    .map(|at| item.key[..query.prefix.len() + at + d.len()].to_owned())
            });
        let entry = rolled_up.clone().unwrap_or_else(|| item.key.clone());
        if let Some(prefix) = &rolled_up {
            // Every key under a common prefix sorts next to the others: none is needed again.
            walk.skip = Some(prefix.clone());
            if page.prefixes.last() == Some(prefix) {
                continue;
            }
        }
        if query
            .after
            .as_deref()
            .is_some_and(|after| entry.as_str() <= after)
        {
            continue;
        }
        if page.len() == query.max_keys {
            page.truncated = true;
            break;
        }
        page.last = Some(entry);
        match rolled_up {
            Some(prefix) => page.prefixes.push(prefix),
            None => page.objects.push(item),
        }
    }
    Ok(page)
}

struct Entry {
    name: String,
    dir: bool,
}

impl Entry {
    /// A directory's keys all start with `name/`: sorting it as that puts its subtree exactly
    /// where its keys belong among its siblings (`a-b` < `a/x` < `a0`).
    fn sort_key(&self) -> String {
        if self.dir {
            format!("{}/", self.name)
        } else {
            self.name.clone()
        }
    }
}

struct Frame {
    /// Key of this directory with its trailing slash; empty for the volume root.
    base: String,
    path: PathBuf,
    /// Sorted descending, so the next entry in key order is popped off the end.
    entries: Vec<Entry>,
}

/// Depth-first over the volume in key order, pruning subtrees that cannot hold a wanted key.
struct Walk<'a> {
    query: &'a ListQuery,
    stack: Vec<Frame>,
    /// Set by the caller: keys under it are no longer wanted.
    skip: Option<String>,
}

impl<'a> Walk<'a> {
    fn new(volume: &Path, query: &'a ListQuery) -> Self {
        Self {
            query,
            stack: vec![start_frame(volume, &query.prefix)],
            skip: None,
        }
    }

    fn next(&mut self) -> io::Result<Option<Listed>> {
        loop {
            let Some(frame) = self.stack.last_mut() else {
                return Ok(None);
            };
            if self
                .skip
                .as_deref()
                .is_some_and(|s| frame.base.starts_with(s))
            {
                self.stack.pop();
                continue;
            }
            let Some(entry) = frame.entries.pop() else {
                self.stack.pop();
                continue;
            };
            if frame.base.is_empty() && entry.name == STAGING_DIR && !self.query.staging_folder {
                continue;
            }
            let key = format!("{}{}", frame.base, entry.name);
            let path = frame.path.join(&entry.name);
            if !entry.dir {
                if self.skip.as_deref().is_some_and(|s| key.starts_with(s)) {
                    continue;
                }
                match std::fs::metadata(&path) {
                    Ok(meta) => {
                        return Ok(Some(Listed {
                            key,
                            size: meta.len(),
                            modified: meta.modified().ok(),
                        }))
                    }
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            let key = key + "/";
            if !self.wanted_under(&key) {
                continue;
            }
            let entries = match read_entries(&path) {
                Ok(entries) => entries,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            let empty = entries.is_empty();
            self.stack.push(Frame {
                base: key.clone(),
                path: path.clone(),
                entries,
            });
            if empty && self.query.empty_folders {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                return Ok(Some(Listed {
                    key,
                    size: 0,
                    modified,
                }));
            }
        }
    }

    /// Whether the directory `dir_key` (ending in `/`) may hold a key the listing still wants.
    fn wanted_under(&self, dir_key: &str) -> bool {
        let prefix = self.query.prefix.as_str();
        if !(dir_key.starts_with(prefix) || prefix.starts_with(dir_key)) {
            return false;
        }
        // Past `after` only if `after` is not inside it and sorts after all of it.
        if let Some(after) = self.query.after.as_deref() {
            if after >= dir_key && !after.starts_with(dir_key) {
                return false;
            }
        }
        !self.skip.as_deref().is_some_and(|s| dir_key.starts_with(s))
    }
}

/// Starts at the deepest directory the prefix names, so `outputs/job/` never reads the rest
/// of the volume. That directory is handed to the walk as an entry of its parent, so an empty
/// one is still listed as a folder.
fn start_frame(volume: &Path, prefix: &str) -> Frame {
    let root = || Frame {
        base: String::new(),
        path: volume.to_owned(),
        entries: read_entries(volume).unwrap_or_default(),
    };
    let Some(slash) = prefix.rfind('/') else {
        return root();
    };
    let parts: Vec<&str> = prefix[..slash].split('/').collect();
    // Keys never hold such components, so the prefix matches nothing wherever the walk starts.
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return root();
    }
    let (last, parents) = parts.split_last().expect("split of a str is never empty");
    let mut base = String::new();
    let mut path = volume.to_owned();
    for part in parents {
        base.push_str(part);
        base.push('/');
        path.push(part);
    }
    Frame {
        base,
        path,
        entries: vec![Entry {
            name: (*last).to_owned(),
            dir: true,
        }],
    }
}

fn read_entries(dir: &Path) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            // Not UTF-8: no S3 key can name it.
            continue;
        };
        let file_type = entry.file_type()?;
        let dir = if file_type.is_symlink() {
            match std::fs::metadata(entry.path()) {
                // Linked directories are left out: a link back up would loop the walk.
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => false,
                Err(_) => continue,
            }
        } else {
            file_type.is_dir()
        };
        entries.push(Entry { name, dir });
    }
    entries.sort_by_cached_key(|e| std::cmp::Reverse(e.sort_key()));
    Ok(entries)
}

/// Removed meanwhile, or never a directory: either way nothing is there to list.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(prefix: &str, delimiter: Option<&str>, after: Option<&str>, max: usize) -> ListQuery {
        ListQuery {
            prefix: prefix.to_owned(),
            delimiter: delimiter.map(str::to_owned),
            after: after.map(str::to_owned),
            max_keys: max,
            empty_folders: true,
            staging_folder: false,
        }
    }

    fn volume(files: &[&str], dirs: &[&str]) -> PathBuf {
        let root = std::env::temp_dir()
            .join("runpod-emulator-listing")
            .join(uuid::Uuid::new_v4().simple().to_string());
        for file in files {
            let path = root.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, file.as_bytes()).unwrap();
        }
        for dir in dirs {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    fn keys(page: &Page) -> Vec<&str> {
        page.objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[test]
    fn keys_come_in_byte_order_across_folders() {
        let v = volume(&["a/x", "a-b", "a0", "a/b/c"], &[]);
        let page = list(&v, &query("", None, None, 100)).unwrap();
        assert_eq!(keys(&page), ["a-b", "a/b/c", "a/x", "a0"]);
        std::fs::remove_dir_all(v).unwrap();
    }

    #[test]
    fn pages_resume_after_the_last_key_without_gaps() {
        let v = volume(&["a/1", "a/2", "b/1", "c"], &["a/e"]);
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let page = list(&v, &query("", None, after.as_deref(), 2)).unwrap();
            seen.extend(keys(&page).into_iter().map(str::to_owned));
            if !page.truncated {
                break;
            }
            after = page.last;
        }
        assert_eq!(seen, ["a/1", "a/2", "a/e/", "b/1", "c"]);
        std::fs::remove_dir_all(v).unwrap();
    }

    #[test]
    fn a_prefix_naming_an_empty_folder_lists_that_folder() {
        let v = volume(&[], &["outputs/job"]);
        let page = list(&v, &query("outputs/job/", Some("/"), None, 100)).unwrap();
        assert_eq!(keys(&page), ["outputs/job/"]);
        std::fs::remove_dir_all(v).unwrap();
    }

    #[test]
    fn a_common_prefix_is_listed_once_and_resumed_past() {
        let v = volume(&["o/a/1", "o/a/2", "o/b/1", "o/c"], &[]);
        let page = list(&v, &query("o/", Some("/"), None, 1)).unwrap();
        assert_eq!(page.prefixes, ["o/a/"]);
        let page = list(&v, &query("o/", Some("/"), page.last.as_deref(), 10)).unwrap();
        assert_eq!(page.prefixes, ["o/b/"]);
        assert_eq!(keys(&page), ["o/c"]);
        std::fs::remove_dir_all(v).unwrap();
    }
}
