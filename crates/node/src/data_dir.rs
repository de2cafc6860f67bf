//! The data directory: the identity key, the API token, the database and the
//! address of the running API. Secrets are readable by the owner only.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use peer_core::Identity;

/// File names inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// The bearer token for the local API.
pub const TOKEN_FILE: &str = "api-token";
/// The database.
pub const DB_FILE: &str = "node.redb";
/// Written by a running node: the address its API is bound to.
pub const API_ADDR_FILE: &str = "api.addr";

/// A problem with the data directory, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A secret file can be read by others.
    #[error("{0} is readable by other users; run `chmod 600 {0}` and start again")]
    Exposed(PathBuf),
    /// A file does not hold what it should.
    #[error(
        "{0} is corrupt ({1}); restore it from a backup or remove the data directory and run `peer init`"
    )]
    Corrupt(PathBuf, &'static str),
    /// No identity yet.
    #[error("no identity in {0}; run `peer init --data-dir {0}` first")]
    NotInitialised(PathBuf),
    /// The identity exists but the API token does not (for example, restored
    /// from a backup of the key alone).
    #[error(
        "{} is missing; run `peer init --data-dir {}` to create a new API token",
        .0.join(TOKEN_FILE).display(),
        .0.display()
    )]
    MissingToken(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `init` found or made.
#[derive(Debug)]
pub struct Secrets {
    /// The node's identity.
    pub identity: Identity,
    /// The local API bearer token.
    pub api_token: String,
    /// Whether this call created them (the identity, and with it the token).
    pub created: bool,
    /// Whether this call created the token, also for an existing identity
    /// whose token was missing.
    pub token_created: bool,
}

/// Loads the identity and token from `dir`, creating the directory (mode 0700)
/// and both secrets (mode 0600) from `random` bytes if they do not exist yet.
/// An existing identity without a token (restored from a backup of the key
/// alone) gets a fresh token; an existing token is never replaced.
pub fn init(
    dir: &Path,
    random: impl FnOnce() -> ([u8; 32], [u8; 32]),
) -> Result<Secrets, DataDirError> {
    let key_path = dir.join(IDENTITY_FILE);
    if key_path.exists() {
        let identity = load_identity(&key_path)?;
        let token_path = dir.join(TOKEN_FILE);
        let token_created = !token_path.exists();
        if token_created {
            let (_, token) = random();
            write_secret(&token_path, format!("{}\n", hex::encode(token)).as_bytes())?;
        }
        return Ok(Secrets {
            identity,
            api_token: read_token(dir)?,
            created: false,
            token_created,
        });
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let (seed, token) = random();
    let identity = Identity::from_secret(&seed);
    let api_token = hex::encode(token);
    write_secret(&dir.join(TOKEN_FILE), format!("{api_token}\n").as_bytes())?;
    write_secret(&key_path, hex::encode(identity.secret_bytes()).as_bytes())?;
    Ok(Secrets {
        identity,
        api_token,
        created: true,
        token_created: true,
    })
}

/// Loads the identity and API token of an initialised data directory. Fails
/// with [`DataDirError::MissingToken`] when only the token is missing (`peer
/// init` creates a new one).
pub fn load(dir: &Path) -> Result<(Identity, String), DataDirError> {
    let key_path = dir.join(IDENTITY_FILE);
    if !key_path.exists() {
        return Err(DataDirError::NotInitialised(dir.to_path_buf()));
    }
    let identity = load_identity(&key_path)?;
    let token = read_token(dir)?;
    Ok((identity, token))
}

fn load_identity(key_path: &Path) -> Result<Identity, DataDirError> {
    let key_hex = read_secret(key_path)?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(key_hex.trim(), &mut seed)
        .map_err(|_| DataDirError::Corrupt(key_path.to_path_buf(), "expected 64 hex digits"))?;
    Ok(Identity::from_secret(&seed))
}

/// Reads the API token (for clients of a running node).
pub fn read_token(dir: &Path) -> Result<String, DataDirError> {
    let path = dir.join(TOKEN_FILE);
    if !path.exists() {
        if dir.join(IDENTITY_FILE).exists() {
            return Err(DataDirError::MissingToken(dir.to_path_buf()));
        }
        return Err(DataDirError::NotInitialised(dir.to_path_buf()));
    }
    let token = read_secret(&path)?.trim().to_owned();
    if token.is_empty() {
        return Err(DataDirError::Corrupt(path, "empty token"));
    }
    Ok(token)
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn read_secret(path: &Path) -> Result<String, DataDirError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(DataDirError::Exposed(path.to_path_buf()));
    }
    fs::read_to_string(path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_owner_only_secrets_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("node");
        let a = init(&dir, || ([1; 32], [2; 32])).expect("init");
        assert!(a.created);
        for f in [IDENTITY_FILE, TOKEN_FILE] {
            let mode = fs::metadata(dir.join(f))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let b = init(&dir, || ([9; 32], [9; 32])).expect("again");
        assert!(!b.created);
        assert_eq!(a.identity.entity_id(), b.identity.entity_id());
        assert_eq!(a.api_token, b.api_token);
    }

    #[test]
    fn a_key_without_its_token_gets_a_fresh_token_from_init_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = init(dir, || ([1; 32], [2; 32])).expect("init");
        fs::remove_file(dir.join(TOKEN_FILE)).expect("lose the token");

        let err = load(dir).expect_err("no token");
        assert!(matches!(err, DataDirError::MissingToken(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(TOKEN_FILE), "{text}");
        assert!(text.contains("peer init"), "{text}");
        let err = read_token(dir).expect_err("no token");
        assert!(matches!(err, DataDirError::MissingToken(_)), "{err:?}");

        let again = init(dir, || ([9; 32], [3; 32])).expect("init makes a token");
        assert!(!again.created);
        assert!(again.token_created);
        assert_eq!(again.identity.entity_id(), first.identity.entity_id());
        assert_eq!(again.api_token, hex::encode([3; 32]));
        assert_ne!(again.api_token, first.api_token);
        let mode = fs::metadata(dir.join(TOKEN_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (identity, token) = load(dir).expect("loads again");
        assert_eq!(identity.entity_id(), first.identity.entity_id());
        assert_eq!(token, again.api_token);

        let third = init(dir, || ([9; 32], [4; 32])).expect("init again");
        assert!(!third.token_created);
        assert_eq!(third.api_token, again.api_token, "an existing token stays");
    }

    #[test]
    fn a_corrupt_key_gets_no_token() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init(dir, || ([1; 32], [2; 32])).expect("init");
        fs::remove_file(dir.join(TOKEN_FILE)).expect("lose the token");
        let key = dir.join(IDENTITY_FILE);
        fs::write(&key, "not hex").expect("corrupt the key");
        let err = init(dir, || ([1; 32], [2; 32])).expect_err("corrupt");
        assert!(matches!(err, DataDirError::Corrupt(..)), "{err:?}");
        assert!(!dir.join(TOKEN_FILE).exists());
    }

    #[test]
    fn exposed_keys_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        init(tmp.path(), || ([1; 32], [2; 32])).expect("init");
        let key = tmp.path().join(IDENTITY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(load(tmp.path()), Err(DataDirError::Exposed(_))));
    }
}
