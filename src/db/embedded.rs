//! A private PostgreSQL cluster for the zero-configuration default.
//!
//! When `database.url` is empty, warden runs `initdb` once in
//! `database.data_dir`, starts the server with `pg_ctl` listening only on a
//! Unix socket inside that directory (no TCP port, nothing shared with other
//! clusters on the machine), and stops it again on shutdown. The server
//! binaries come from `PATH` or `/usr/lib/postgresql/<version>/bin`.
//!
//! PostgreSQL refuses to run as root. When warden runs as root (containers,
//! CI machines), the cluster belongs to the `postgres` system user and every
//! server binary runs as that user.

use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use tokio::process::Command;

/// The database warden creates inside its own cluster.
pub const DATABASE: &str = "warden";
/// Superuser name given to `initdb`, the same whoever runs it.
pub const SUPERUSER: &str = "postgres";
/// Port number; it only names the socket file inside the data directory.
const PORT: u16 = 5432;
/// Marker appended to postgresql.conf so the settings are written only once.
const CONF_MARKER: &str = "# --- warden embedded cluster ---";
/// The longest path of a Unix socket (`sun_path` less its final NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found {where_}; \
         install them (Debian/Ubuntu: apt-get install postgresql) or set database.url"
    )]
    BinariesMissing { where_: String },
    #[error(
        "warden runs as root and PostgreSQL refuses to; no `postgres` system user exists to run it as. \
         Run warden as an ordinary user, create that user, or set database.url"
    )]
    NoUnprivilegedUser,
    #[error("{path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("{step} failed for the embedded cluster in {data_dir}\n{detail}")]
    Command { step: &'static str, data_dir: PathBuf, detail: String },
    #[error("could not connect to the embedded cluster: {0}")]
    Connect(#[from] tokio_postgres::Error),
}

/// The user a child process runs as when warden itself is root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedCluster {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    /// False when the server was already running (left by a crashed warden
    /// or shared with another process): then shutdown leaves it running.
    started_here: bool,
}

impl EmbeddedCluster {
    /// Initialises the data directory if needed, starts the server unless it
    /// already runs, and makes sure the `warden` database exists.
    /// `bin_dir` pins the directory of the server binaries; `None` searches.
    pub async fn start(data_dir: &Path, bin_dir: Option<&Path>) -> Result<Self, EmbeddedError> {
        let bin_dir = match bin_dir {
            Some(dir) if has_server_binaries(dir) => dir.to_path_buf(),
            Some(dir) => {
                return Err(EmbeddedError::BinariesMissing {
                    where_: format!("in {} (database.pg_bin_dir)", dir.display()),
                });
            }
            None => find_bin_dir(std::env::var_os("PATH"), Path::new("/usr/lib/postgresql")).ok_or_else(|| {
                EmbeddedError::BinariesMissing { where_: "on PATH or under /usr/lib/postgresql/*/bin".into() }
            })?,
        };
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user(SUPERUSER).ok_or(EmbeddedError::NoUnprivilegedUser)?)
        } else {
            None
        };
        let data_dir = absolute(data_dir)?;
        if let Err(reason) = socket_fits(&data_dir) {
            return Err(data_dir_error(&data_dir, &reason));
        }
        let mut cluster = Self { data_dir, bin_dir, run_as, started_here: false };
        cluster.init_if_needed().await?;
        if cluster.is_running().await {
            tracing::info!(data_dir = %cluster.data_dir.display(), "embedded PostgreSQL already running; reusing it");
        } else {
            cluster.pg_ctl_start().await?;
            cluster.started_here = true;
            tracing::info!(data_dir = %cluster.data_dir.display(), "embedded PostgreSQL started");
        }
        if let Err(e) = cluster.ensure_database().await {
            // Not left running for nobody: the next start would take it for
            // someone else's and never stop it.
            cluster.stop().await;
            return Err(e);
        }
        Ok(cluster)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Connection settings for the `warden` database over the private socket.
    pub fn connect_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host_path(&self.data_dir).port(PORT).user(SUPERUSER).dbname(DATABASE);
        config
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every open
    /// connection is cut, as in a failover or a maintenance restart. Unlike
    /// [`stop`](Self::stop) it acts whoever started the server; tests use
    /// it on clusters of their own.
    pub async fn restart(&self) -> Result<(), EmbeddedError> {
        self.launch("pg_ctl restart", &[os("-m"), os("fast"), os("restart")]).await
    }

    /// Starts the server again if it is not running (it crashed, ran out
    /// of memory, was killed): with the default settings nobody else looks
    /// after it. Returns whether it had to.
    pub async fn revive(&self) -> Result<bool, EmbeddedError> {
        if self.is_running().await {
            return Ok(false);
        }
        self.pg_ctl_start().await?;
        Ok(true)
    }

    /// Stops the server if this process started it.
    pub async fn stop(&self) {
        if !self.started_here {
            return;
        }
        let args = [os("-D"), self.data_dir.as_os_str(), os("-m"), os("fast"), os("-w"), os("stop")];
        match self.run("pg_ctl stop", "pg_ctl", &args).await {
            Ok(_) => tracing::info!("embedded PostgreSQL stopped"),
            Err(e) => tracing::error!(error = %e, "could not stop embedded PostgreSQL"),
        }
    }

    async fn init_if_needed(&self) -> Result<(), EmbeddedError> {
        let dir = &self.data_dir;
        if dir.join("PG_VERSION").is_file() {
            return self.check_version();
        }
        if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(data_dir_error(
                dir,
                "exists but is not a PostgreSQL data directory; empty it or choose another database.data_dir",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| data_dir_error(dir, &format!("cannot create: {e}")))?;
        if let Some(user) = self.run_as {
            check_reachable(dir, user)?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| data_dir_error(dir, &format!("cannot set permissions: {e}")))?;
        if let Some(user) = self.run_as {
            chown(dir, user)?;
        }
        let args = [
            os("-D"),
            dir.as_os_str(),
            os("-U"),
            os(SUPERUSER),
            os("--auth=trust"),
            os("--encoding=UTF8"),
            os("--locale=C"),
        ];
        self.run("initdb", "initdb", &args).await?;
        // Only a Unix socket inside the (0700) data directory: no TCP port to
        // collide with other clusters, and only this user (or root) connects.
        let mut conf = format!("\n{CONF_MARKER}\nlisten_addresses = ''\nport = {PORT}\n");
        let _ = writeln!(conf, "unix_socket_directories = '{}'", dir.display().to_string().replace('\'', "''"));
        let path = dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).map_err(|e| data_dir_error(&path, &e.to_string()))?;
        text.push_str(&conf);
        std::fs::write(&path, text).map_err(|e| data_dir_error(&path, &e.to_string()))?;
        tracing::info!(data_dir = %dir.display(), "initialised embedded PostgreSQL cluster");
        Ok(())
    }

    /// A data directory from another major version cannot be started by
    /// these binaries; say so instead of letting pg_ctl fail obscurely.
    fn check_version(&self) -> Result<(), EmbeddedError> {
        let found = std::fs::read_to_string(self.data_dir.join("PG_VERSION")).unwrap_or_default();
        let found = found.trim();
        let ours = self.bin_dir.parent().and_then(|p| p.file_name()).and_then(OsStr::to_str).unwrap_or("");
        if !ours.is_empty() && ours.chars().all(|c| c.is_ascii_digit()) && ours != found {
            return Err(data_dir_error(
                &self.data_dir,
                &format!(
                    "was created by PostgreSQL {found} but the server binaries are version {ours}; upgrade it with pg_upgrade or choose another database.data_dir"
                ),
            ));
        }
        Ok(())
    }

    async fn is_running(&self) -> bool {
        let args = [os("-D"), self.data_dir.as_os_str(), os("status")];
        self.run("pg_ctl status", "pg_ctl", &args).await.is_ok()
    }

    async fn pg_ctl_start(&self) -> Result<(), EmbeddedError> {
        self.launch("pg_ctl start", &[os("start")]).await
    }

    /// Runs a `pg_ctl` verb that starts a server, waiting until it accepts
    /// connections. The server's output goes to `server.log` (without it
    /// the server would inherit pg_ctl's captured stdout and the call would
    /// never return); on failure the log's tail is added to the error.
    async fn launch(&self, step: &'static str, verb: &[&OsStr]) -> Result<(), EmbeddedError> {
        let log = self.data_dir.join("server.log");
        let mut args =
            vec![os("-D"), self.data_dir.as_os_str(), os("-l"), log.as_os_str(), os("-w"), os("-t"), os("120")];
        args.extend_from_slice(verb);
        self.run(step, "pg_ctl", &args).await.map_err(|e| match e {
            EmbeddedError::Command { step, data_dir, mut detail } => {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(10).collect();
                for line in tail.into_iter().rev() {
                    detail.push('\n');
                    detail.push_str(line);
                }
                EmbeddedError::Command { step, data_dir, detail }
            }
            other => other,
        })?;
        Ok(())
    }

    async fn ensure_database(&self) -> Result<(), EmbeddedError> {
        let mut config = self.connect_config();
        config.dbname("postgres");
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(connection);
        let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE]).await?.is_some();
        if !exists {
            // The name is a constant; CREATE DATABASE takes no parameters.
            client.batch_execute(&format!("CREATE DATABASE {DATABASE}")).await?;
        }
        drop(client);
        let _ = conn.await;
        Ok(())
    }

    /// Runs a server binary, as the unprivileged user when we are root, and
    /// turns a non-zero exit into an error carrying its output.
    async fn run(&self, step: &'static str, program: &str, args: &[&OsStr]) -> Result<Output, EmbeddedError> {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.args(args)
            .current_dir("/")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(user) = self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        let output = cmd.output().await.map_err(|e| EmbeddedError::Command {
            step,
            data_dir: self.data_dir.clone(),
            detail: format!("could not run {}: {e}", self.bin_dir.join(program).display()),
        })?;
        if output.status.success() {
            return Ok(output);
        }
        let mut detail = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if detail.is_empty() {
            detail = stdout.trim().to_string();
        }
        Err(EmbeddedError::Command { step, data_dir: self.data_dir.clone(), detail })
    }
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// The socket lives in the data directory, and a Unix socket's path is at
/// most 107 bytes: beyond, the server fails to start with the reason only
/// in its log. Checked with the settings, before initdb leaves a directory
/// behind.
pub(crate) fn socket_fits(data_dir: &Path) -> Result<(), String> {
    let socket = std::path::absolute(data_dir).map_err(|e| e.to_string())?.join(format!(".s.PGSQL.{PORT}"));
    let length = socket.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        return Err(format!(
            "a shorter path: the cluster's socket would be {length} bytes ({}), over the {MAX_SOCKET_PATH} a Unix \
             socket's path may have",
            socket.display()
        ));
    }
    Ok(())
}

fn data_dir_error(path: &Path, reason: &str) -> EmbeddedError {
    EmbeddedError::DataDir { path: path.to_path_buf(), reason: reason.to_string() }
}

fn absolute(path: &Path) -> Result<PathBuf, EmbeddedError> {
    std::path::absolute(path).map_err(|e| data_dir_error(path, &e.to_string()))
}

/// The directory holding `initdb` and `pg_ctl`: first on PATH, else the
/// newest `/usr/lib/postgresql/<major>/bin` (Debian's layout, where the
/// server binaries are not on PATH).
fn find_bin_dir(path_var: Option<std::ffi::OsString>, lib_root: &Path) -> Option<PathBuf> {
    if let Some(dir) = path_var.and_then(|p| std::env::split_paths(&p).find(|d| has_server_binaries(d))) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(lib_root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server_binaries(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn has_server_binaries(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to memory owned by this frame and sized
    // as passed; getpwnam_r writes only into `pwd` and `buf`.
    let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(RunAs { uid: pwd.pw_uid, gid: pwd.pw_gid })
}

/// The server, running as `user`, must be able to walk down to its data
/// directory. A checkout under /root (mode 0700) is the usual trap.
fn check_reachable(dir: &Path, user: RunAs) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else { continue };
        let mode = meta.mode();
        let searchable = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(data_dir_error(
                dir,
                &format!(
                    "the postgres user cannot reach it because {} is not searchable by others; \
                     run `chmod o+x {}` or choose a database.data_dir elsewhere (e.g. /var/lib/warden)",
                    ancestor.display(),
                    ancestor.display()
                ),
            ));
        }
    }
    Ok(())
}

fn chown(path: &Path, user: RunAs) -> Result<(), EmbeddedError> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| data_dir_error(path, &format!("cannot hand the directory to the postgres user: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bin(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("initdb"), "").unwrap();
        std::fs::write(dir.join("pg_ctl"), "").unwrap();
    }

    #[test]
    fn binaries_on_path_win_over_the_debian_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let on_path = tmp.path().join("path-bin");
        fake_bin(&on_path);
        fake_bin(&tmp.path().join("lib/16/bin"));
        let path = std::env::join_paths([tmp.path().join("empty"), on_path.clone()]).unwrap();
        assert_eq!(find_bin_dir(Some(path), &tmp.path().join("lib")), Some(on_path));
    }

    #[test]
    fn the_newest_debian_version_is_chosen_numerically() {
        let tmp = tempfile::tempdir().unwrap();
        for v in ["9", "15", "16"] {
            fake_bin(&tmp.path().join(format!("lib/{v}/bin")));
        }
        std::fs::create_dir_all(tmp.path().join("lib/17/bin")).unwrap(); // no binaries
        let found = find_bin_dir(None, &tmp.path().join("lib"));
        assert_eq!(found, Some(tmp.path().join("lib/16/bin")));
    }

    #[test]
    fn nothing_found_is_none() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(find_bin_dir(Some("".into()), &tmp.path().join("missing")), None);
    }
}
