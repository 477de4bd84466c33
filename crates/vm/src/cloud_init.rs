//! cloud-init's NoCloud seed: a small FAT disk labelled `CIDATA` holding `meta-data`,
//! `user-data` and, when given, `network-config`. cloud-init finds it by its label.
//! Made in-process with the `fatfs` crate, so no loop mount, mtools or root is needed.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a guest's cloud-init reads at first boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInit {
    /// cloud-init runs its once-per-instance modules again when this changes.
    pub instance_id: String,
    pub hostname: String,
    /// `#cloud-config` YAML (users, SSH keys, files, commands); an empty config without.
    #[serde(default)]
    pub user_data: Option<String>,
    /// Network config (version 1 or 2 YAML); without it cloud-init runs DHCP on the
    /// first NIC, which is what a vmfabric network serves.
    #[serde(default)]
    pub network_config: Option<String>,
}

/// Large enough for any sensible user-data and small enough to cost nothing.
const SEED_BYTES: u64 = 2 << 20;

impl CloudInit {
    /// `meta-data`: YAML, the two keys NoCloud reads. Quoted as JSON strings, which
    /// YAML reads as they are, so no name can break the document.
    pub fn meta_data(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            q(&self.instance_id),
            q(&self.hostname)
        )
    }

    /// Writes the seed image at `path` (replacing any file there).
    pub fn write_seed(&self, path: &Path) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(SEED_BYTES)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
        )?;
        file.seek(SeekFrom::Start(0))?;
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
        let root = fs.root_dir();
        let user_data = self.user_data.clone().unwrap_or_else(|| "#cloud-config\n{}\n".into());
        let mut files = vec![("meta-data", self.meta_data()), ("user-data", user_data)];
        if let Some(n) = &self.network_config {
            files.push(("network-config", n.clone()));
        }
        for (name, text) in files {
            let mut f = root.create_file(name)?;
            f.truncate()?;
            f.write_all(text.as_bytes())?;
            f.flush()?;
        }
        drop(root);
        fs.unmount()?;
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_seed_is_a_cidata_fat_volume_with_the_three_files() {
        let path = std::env::temp_dir().join(format!("vmf-seed-{}.img", std::process::id()));
        let ci = CloudInit {
            instance_id: "i-web-1".into(),
            hostname: "web-1".into(),
            user_data: Some("#cloud-config\nhostname: web-1\n".into()),
            network_config: Some("version: 2\n".into()),
        };
        ci.write_seed(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let read = |name: &str| {
            let mut s = String::new();
            fs.root_dir().open_file(name).unwrap().read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(
            read("meta-data"),
            "instance-id: \"i-web-1\"\nlocal-hostname: \"web-1\"\n"
        );
        assert_eq!(read("user-data"), "#cloud-config\nhostname: web-1\n");
        assert_eq!(read("network-config"), "version: 2\n");
        drop(fs);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn names_cannot_break_the_meta_data() {
        let ci = CloudInit {
            instance_id: "a\"\nb: c".into(),
            hostname: "h".into(),
            ..Default::default()
        };
        assert_eq!(ci.meta_data(), "instance-id: \"a\\\"\\nb: c\"\nlocal-hostname: \"h\"\n");
    }
}
