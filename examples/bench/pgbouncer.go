package main

// PgBouncer as a contender: the transaction pooler an operator would put in
// front of the server instead of changing the application's driver.
//
// Configuration, and why:
//   - pool_mode = transaction: a server connection is lent to a client for
//     one transaction only, the mode in which PgBouncer can serve many
//     workspaces' clients with few backends. (Session mode would pin a
//     backend to each idle client connection, as the naive pools do.)
//   - one wildcard database entry, "* = host=... port=...": every workspace
//     database is reached under its own name without listing 10,000 of them.
//   - max_user_connections = B: all pools of the app role together hold at
//     most B server connections, the same budget the other contenders get
//     (and the role's CONNECTION LIMIT). When it is reached PgBouncer closes
//     an idle server connection of another pool to open one for a waiting
//     client, or the client waits.
//   - default_pool_size = 3: the per-database cap of the other contenders.
//   - auth_type = scram-sha-256 with an auth_file listing the app role and
//     its password: PgBouncer checks its clients' logins as the server
//     checks the other contenders', and logs in to the server with it.
//   - with -tls, TLS on both sides: clients reach PgBouncer with
//     sslmode=verify-full (the server's certificate, which names
//     127.0.0.1), and PgBouncer reaches the server with verify-full.
//   - max_client_conn: every workspace's *sql.DB may keep up to 3 client
//     connections, so 3 W plus slack.
//   - everything else at PgBouncer's defaults, notably server_idle_timeout
//     (600 s), server_lifetime (3600 s), server_login_retry (15 s: a pool
//     whose server login failed, e.g. refused for lack of slots, waits that
//     long before trying again), query_wait_timeout (120 s, longer than the
//     harness's per-operation timeout, so a client waiting for a server
//     connection shows up as a deadline error) and autodb_idle_timeout.
//
// The application side is pgx's stdlib with default_query_exec_mode=exec in
// the DSN: pgx's default statement cache prepares named statements on a
// backend, and under transaction pooling the next transaction may run on a
// backend that never saw them.
//
// PgBouncer refuses to run as root; when the harness is root it runs as the
// postgres OS user, as the throwaway server does, with its files in a
// temporary directory that user owns.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// errNotInstalled reports that no pgbouncer binary was found.
var errNotInstalled = errors.New("not installed")

// findPgbouncer returns the pgbouncer binary: the flag's path if given,
// else the one in PATH, else Debian's /usr/sbin/pgbouncer (not in a
// non-root PATH).
func findPgbouncer(path string) (string, error) {
	if path != "" {
		if _, err := os.Stat(path); err != nil {
			return "", fmt.Errorf("pgbouncer %s: %w", path, errNotInstalled)
		}
		return path, nil
	}
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/pgbouncer"); err == nil {
		return "/usr/sbin/pgbouncer", nil
	}
	return "", errNotInstalled
}

// pgbouncerVersion returns the first line of pgbouncer --version.
func pgbouncerVersion(bin string) string {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return "unknown version"
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}

// bouncer is a running PgBouncer.
type bouncer struct {
	cmd    *exec.Cmd
	dir    string
	port   int
	exited chan struct{}
	stderr *capBuffer
}

// startBouncer starts PgBouncer in front of w's server and returns once it
// accepts TCP connections.
func startBouncer(ctx context.Context, bin string, w *world, budget, maxClients int, extra []string) (*bouncer, error) {
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		var err error
		if cred, err = pgtest.PostgresCredential(); err != nil {
			return nil, fmt.Errorf("pgbouncer refuses to run as root: %w", err)
		}
	}
	dir, err := os.MkdirTemp("", "tenantpg-bench-pgbouncer-")
	if err != nil {
		return nil, fmt.Errorf("pgbouncer: temporary directory: %w", err)
	}
	fail := func(err error) (*bouncer, error) {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	// auth_file: "user" "password", double quotes doubled. Mode 0600 and
	// owned by the user PgBouncer runs as: it holds the password.
	userlist := fmt.Sprintf("%s %s\n", pgbQuote(w.role), pgbQuote(password))
	if err := os.WriteFile(filepath.Join(dir, "userlist.txt"), []byte(userlist), 0o600); err != nil {
		return fail(fmt.Errorf("pgbouncer: write auth_file: %w", err))
	}
	if cred != nil {
		for _, p := range []string{dir, filepath.Join(dir, "userlist.txt")} {
			if err := os.Chown(p, int(cred.Uid), int(cred.Gid)); err != nil {
				return fail(fmt.Errorf("pgbouncer: hand %s to the postgres user: %w", filepath.Base(p), err))
			}
		}
	}
	// A free port may be taken between probing and binding; PgBouncer then
	// exits at once and another port is tried.
	for attempt := 0; ; attempt++ {
		b, err := launchBouncer(ctx, bin, dir, cred, w, budget, maxClients, extra)
		if err == nil || attempt == 2 || ctx.Err() != nil {
			if err != nil {
				return fail(err)
			}
			return b, nil
		}
	}
}

func launchBouncer(ctx context.Context, bin, dir string, cred *syscall.Credential, w *world, budget, maxClients int, extra []string) (*bouncer, error) {
	port, err := pgtest.FreePort()
	if err != nil {
		return nil, fmt.Errorf("pgbouncer: free port: %w", err)
	}
	ini := fmt.Sprintf(`[databases]
* = host=%s port=%d

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = scram-sha-256
auth_file = %s
pool_mode = transaction
max_client_conn = %d
default_pool_size = 3
max_user_connections = %d
logfile = %s
pidfile = %s
log_connections = 0
log_disconnections = 0
ignore_startup_parameters = extra_float_digits
`, w.srv.Host, w.srv.Port, port, filepath.Join(dir, "userlist.txt"), maxClients, budget,
		filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid"))
	if w.srv.CertFile != "" {
		ini += fmt.Sprintf("client_tls_sslmode = require\nclient_tls_cert_file = %s\nclient_tls_key_file = %s\n"+
			"server_tls_sslmode = verify-full\nserver_tls_ca_file = %s\n", w.srv.CertFile, w.srv.KeyFile, w.srv.CertFile)
	}
	// Later lines win in PgBouncer's ini parser: -pgbouncer-set overrides.
	for _, kv := range extra {
		name, value, _ := strings.Cut(kv, "=")
		ini += strings.TrimSpace(name) + " = " + strings.TrimSpace(value) + "\n"
	}
	iniPath := filepath.Join(dir, "pgbouncer.ini")
	if err := os.WriteFile(iniPath, []byte(ini), 0o644); err != nil {
		return nil, fmt.Errorf("pgbouncer: write config: %w", err)
	}
	if cred != nil {
		if err := os.Chown(iniPath, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, fmt.Errorf("pgbouncer: hand the config to the postgres user: %w", err)
		}
	}
	b := &bouncer{dir: dir, port: port, exited: make(chan struct{}), stderr: &capBuffer{max: 8 << 10}}
	b.cmd = exec.Command(bin, iniPath)
	b.cmd.Dir = dir
	b.cmd.Stderr = b.stderr
	// SIGTERM is PgBouncer's immediate shutdown: if the harness dies, its
	// PgBouncer goes with it.
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGTERM}
	if err := b.cmd.Start(); err != nil {
		return nil, fmt.Errorf("pgbouncer: start: %w", err)
	}
	go func() {
		_ = b.cmd.Wait()
		close(b.exited)
	}()
	// Ready once it accepts a TCP connection: PgBouncer has no readiness
	// line on stderr that survives log settings.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
		if err == nil {
			c.Close()
			return b, nil
		}
		select {
		case <-b.exited:
			return nil, fmt.Errorf("pgbouncer exited during start-up: %s", b.diagnostics())
		case <-ctx.Done():
			b.kill()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.kill()
			return nil, fmt.Errorf("pgbouncer did not accept connections within 10s: %s", b.diagnostics())
		}
	}
}

// diagnostics returns the end of PgBouncer's stderr and log file.
func (b *bouncer) diagnostics() string {
	s := strings.TrimSpace(b.stderr.String())
	if log, err := os.ReadFile(filepath.Join(b.dir, "pgbouncer.log")); err == nil {
		lines := strings.Split(strings.TrimSpace(string(log)), "\n")
		s += "\n" + strings.Join(lines[max(0, len(lines)-10):], "\n")
	}
	return strings.ReplaceAll(s, password, "[redacted]")
}

// kill stops the process: SIGTERM (immediate shutdown: server connections
// are closed, so the server's backends end), then SIGKILL after 5s.
func (b *bouncer) kill() {
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(5 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
}

// stop kills PgBouncer and removes its files.
func (b *bouncer) stop() {
	b.kill()
	_ = os.RemoveAll(b.dir)
}

func pgbQuote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// capBuffer keeps the first max bytes written to it.
type capBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

func (c *capBuffer) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if room := c.max - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (c *capBuffer) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}
