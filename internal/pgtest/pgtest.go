// Package pgtest starts a throwaway PostgreSQL server for tests and examples.
//
// It looks for initdb and postgres in PATH, then in /usr/lib/postgresql/*/bin
// (newest version first), initialises a cluster in a temporary directory with
// durability switched off, and starts it on a free port on 127.0.0.1. As on a
// production server, every TCP login is checked with scram-sha-256, the
// superuser's included (its password is random per server); only the
// server's own Unix socket, in the server's private directory, trusts. When the process runs as root the server runs as the
// "postgres" OS user, because PostgreSQL refuses to run as root.
//
// In a test binary run with -short, Start starts nothing and returns
// ErrShort, and Main runs the tests without a server: every test that calls
// Require skips, so go test -short runs only the tests that need no server.
//
// TENANTPG_TEST_DATABASE_URL may name an existing server instead; it must be a
// superuser connection string, and everything the tests create on it carries
// a per-run prefix and is dropped by Stop.
//
// The package is internal: it exists for this repository's tests and for the
// examples module (internal is by import path, so the module
// github.com/tenantpg/tenantpg/examples may import it), and is not a
// supported API.
package pgtest

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"database/sql"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the admin connection uses plain pgx
)

// EnvURL names the environment variable that points the tests at an existing
// PostgreSQL superuser instead of a throwaway server.
const EnvURL = "TENANTPG_TEST_DATABASE_URL"

// ErrNotFound reports that no PostgreSQL binaries could be found.
var ErrNotFound = errors.New("pgtest: PostgreSQL binaries (initdb, postgres) not found in PATH or /usr/lib/postgresql/*/bin; " +
	"install them (Debian: apt-get install postgresql) or set " + EnvURL + " to a superuser connection string")

// ErrShort reports that a test binary runs with -short, in which no server
// is started (nor attached to): the tests that need one skip.
var ErrShort = errors.New("needs PostgreSQL; skipped in -short mode")

// shortMode reports whether this is a test binary run with -short.
// testing.Short panics before the test flags are parsed, so it is asked
// only once they are.
func shortMode() bool {
	return testing.Testing() && flag.Parsed() && testing.Short()
}

// Options configure a throwaway server.
type Options struct {
	// MaxConnections is the server's max_connections (default 100). Tests
	// choose a small value so that limits are really hit.
	MaxConnections int
	// Settings are extra "-c name=value" server settings.
	Settings map[string]string
	// TLS starts the server with ssl=on and a self-signed certificate for
	// 127.0.0.1 and localhost; URL then asks for sslmode=verify-full with
	// that certificate as the root, as a production client would.
	TLS bool
}

// Server is a running PostgreSQL server, either started by Start or given by
// EnvURL.
type Server struct {
	Host string
	Port int
	// CertFile is the server's certificate (its own root) and KeyFile its
	// private key when it runs with TLS; empty otherwise.
	CertFile, KeyFile string
	// Prefix is prepended to every role and database the helpers create, so
	// that runs against a shared server do not collide.
	Prefix string

	adminUser string
	adminPass string
	admin     *sql.DB

	// Set only for a server this package started.
	cmd       *exec.Cmd
	dir       string
	binDir    string
	runAs     *syscall.Credential
	opts      Options
	exited    chan struct{}
	logMu     sync.Mutex
	logTail   []string
	createdMu sync.Mutex
	roles     []string
	databases []string
}

// Start starts a throwaway server, or connects to the one named by EnvURL.
func Start(opts Options) (*Server, error) {
	if shortMode() {
		return nil, ErrShort
	}
	if opts.MaxConnections == 0 {
		opts.MaxConnections = 100
	}
	prefix := fmt.Sprintf("tpg%d_", os.Getpid()%100000)
	if raw := os.Getenv(EnvURL); raw != "" {
		return attach(raw, prefix)
	}
	binDir, err := findBinDir()
	if err != nil {
		return nil, err
	}
	s := &Server{Host: "127.0.0.1", Prefix: prefix, adminUser: "postgres", binDir: binDir, opts: opts}
	if os.Geteuid() == 0 {
		cred, err := PostgresCredential()
		if err != nil {
			return nil, err
		}
		s.runAs = cred
	}
	if s.dir, err = os.MkdirTemp("", "tenantpg-pg-"); err != nil {
		return nil, err
	}
	if s.runAs != nil {
		if err := os.Chown(s.dir, int(s.runAs.Uid), int(s.runAs.Gid)); err != nil {
			s.cleanup()
			return nil, err
		}
	}
	if err := s.initdb(); err != nil {
		s.cleanup()
		return nil, err
	}
	if opts.TLS {
		if err := s.writeCertificate(); err != nil {
			s.cleanup()
			return nil, err
		}
	}
	// A free port can be taken by someone else between probing and binding;
	// postgres then fails fast and we try another.
	for attempt := 0; ; attempt++ {
		if s.Port, err = FreePort(); err != nil {
			s.cleanup()
			return nil, err
		}
		err = s.start()
		if err == nil || attempt == 2 {
			break
		}
	}
	if err != nil {
		s.cleanup()
		return nil, err
	}
	if s.admin, err = sql.Open("pgx", s.URL(s.adminUser, "", "postgres")); err != nil {
		s.Stop()
		return nil, err
	}
	s.admin.SetMaxOpenConns(4)
	return s, nil
}

func attach(raw, prefix string) (*Server, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" {
		return nil, fmt.Errorf("pgtest: %s must be a postgres:// URL", EnvURL)
	}
	port := 5432
	if p := u.Port(); p != "" {
		if port, err = strconv.Atoi(p); err != nil {
			return nil, fmt.Errorf("pgtest: %s: bad port", EnvURL)
		}
	}
	pass, _ := u.User.Password()
	s := &Server{Host: u.Hostname(), Port: port, Prefix: prefix, adminUser: u.User.Username(), adminPass: pass}
	if s.admin, err = sql.Open("pgx", raw); err != nil {
		return nil, err
	}
	s.admin.SetMaxOpenConns(4)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.admin.PingContext(ctx); err != nil {
		return nil, fmt.Errorf("pgtest: cannot reach the server named by %s: %w", EnvURL, err)
	}
	return s, nil
}

func findBinDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			p = real
		}
		dir := filepath.Dir(p)
		if _, err := os.Stat(filepath.Join(dir, "postgres")); err == nil {
			return dir, nil
		}
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	sort.Slice(matches, func(i, j int) bool { return versionOf(matches[i]) > versionOf(matches[j]) })
	for _, m := range matches {
		dir := filepath.Dir(m)
		if _, err := os.Stat(filepath.Join(dir, "postgres")); err == nil {
			return dir, nil
		}
	}
	return "", ErrNotFound
}

func versionOf(initdbPath string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdbPath))))
	return v
}

// PostgresCredential is the credential of the postgres OS user, for servers
// (PostgreSQL, PgBouncer) that refuse to run as root.
func PostgresCredential() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs a 'postgres' OS user to run the server as: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.binDir, name), args...)
	cmd.Dir = s.dir
	// SIGQUIT is PostgreSQL's immediate shutdown: if the test binary dies,
	// the postmaster takes its backends down with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.runAs, Pdeathsig: syscall.SIGQUIT}
	cmd.Env = append(os.Environ(), "LC_ALL=C", "LANG=C")
	return cmd
}

func (s *Server) dataDir() string { return filepath.Join(s.dir, "data") }

func (s *Server) initdb() error {
	pw := make([]byte, 16)
	if _, err := rand.Read(pw); err != nil {
		return err
	}
	s.adminPass = hex.EncodeToString(pw)
	pwfile := filepath.Join(s.dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(s.adminPass+"\n"), 0o600); err != nil {
		return err
	}
	defer os.Remove(pwfile)
	if s.runAs != nil {
		if err := os.Chown(pwfile, int(s.runAs.Uid), int(s.runAs.Gid)); err != nil {
			return err
		}
	}
	cmd := s.command("initdb", "-D", s.dataDir(), "-U", s.adminUser,
		"--auth-host=scram-sha-256", "--auth-local=trust", "--pwfile="+pwfile,
		"--no-sync", "--locale=C", "-E", "UTF8", "--no-instructions")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("pgtest: initdb failed: %w\n%s", err, out)
	}
	return nil
}

// start runs the postmaster and returns once it logs that it accepts
// connections: the log line is the readiness signal, so nothing polls.
func (s *Server) start() error {
	args := []string{"-D", s.dataDir(), "-p", strconv.Itoa(s.Port), "-h", s.Host, "-k", s.dir,
		"-c", "max_connections=" + strconv.Itoa(s.opts.MaxConnections),
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "shared_buffers=64MB", "-c", "log_min_messages=warning", "-c", "password_encryption=scram-sha-256",
		"-c", "log_connections=off", "-c", "log_disconnections=off"}
	if s.CertFile != "" {
		args = append(args, "-c", "ssl=on", "-c", "ssl_cert_file="+s.CertFile, "-c", "ssl_key_file="+s.KeyFile)
	}
	keys := make([]string, 0, len(s.opts.Settings))
	for k := range s.opts.Settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "-c", k+"="+s.opts.Settings[k])
	}
	cmd := s.command("postgres", args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	cmd.Stdout = nil
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("pgtest: starting postgres: %w", err)
	}
	ready := make(chan struct{})
	exited := make(chan struct{})
	go s.readLog(stderr, ready)
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	select {
	case <-ready:
	case <-exited:
		return fmt.Errorf("pgtest: postgres exited during start-up:\n%s", s.tail())
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("pgtest: postgres did not become ready within 60s:\n%s", s.tail())
	}
	s.cmd, s.exited = cmd, exited
	return nil
}

// readLog keeps draining the server's stderr for its whole life (a full pipe
// would stall the postmaster) and remembers the last lines for diagnostics.
func (s *Server) readLog(r interface{ Read([]byte) (int, error) }, ready chan struct{}) {
	sc := bufio.NewScanner(r)
	signalled := false
	for sc.Scan() {
		line := sc.Text()
		s.logMu.Lock()
		s.logTail = append(s.logTail, line)
		if len(s.logTail) > 50 {
			s.logTail = s.logTail[len(s.logTail)-50:]
		}
		s.logMu.Unlock()
		if !signalled && strings.Contains(line, "ready to accept connections") {
			signalled = true
			close(ready)
		}
	}
}

func (s *Server) tail() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return strings.Join(s.logTail, "\n")
}

// Log returns the last lines the server wrote to its log.
func (s *Server) Log() string { return s.tail() }

// Stopped reports whether the server process has exited.
func (s *Server) stopProcess(sig syscall.Signal) error {
	if s.cmd == nil {
		return nil
	}
	_ = s.cmd.Process.Signal(sig)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	s.cmd = nil
	return nil
}

// Restart performs a fast shutdown and starts the server again on the same
// port, as an operator's restart would. It is not available for a server
// named by EnvURL.
func (s *Server) Restart() error {
	if err := s.Shutdown(); err != nil {
		return err
	}
	return s.Start()
}

// Shutdown performs a fast shutdown (every backend is terminated) and
// returns once the server has exited; Start starts it again on the same
// port. Between the two, dials are refused: an outage as long as the
// caller makes it. Not available for a server named by EnvURL.
func (s *Server) Shutdown() error {
	if s.dir == "" {
		return errors.New("pgtest: cannot stop a server this package did not start")
	}
	return s.stopProcess(syscall.SIGINT)
}

// Start starts a server stopped by Shutdown and returns once it accepts
// connections.
func (s *Server) Start() error {
	if s.dir == "" {
		return errors.New("pgtest: cannot start a server this package did not start")
	}
	if err := s.start(); err != nil {
		return err
	}
	// The admin pool's idle connections died with the old server: drop
	// them, so the next admin query dials the new one.
	s.admin.SetMaxIdleConns(0)
	s.admin.SetMaxIdleConns(2)
	return nil
}

// DropIdleAdminConns closes the admin pool's idle connections, for a leak
// check at the end of a test. pgx starts a background reader on a
// connection whose write is slow (its slow-write timer, 15ms) and leaves it
// blocked in Read until data arrives or the connection closes; an idle
// admin connection that once wrote slowly on a loaded machine would keep
// such a goroutine, which the check would blame on whichever test was
// running. (Inferred from the goroutine's stack, pgx's source and the
// failures seen only under load; not isolated by an experiment.)
func (s *Server) DropIdleAdminConns() {
	s.admin.SetMaxIdleConns(0)
	s.admin.SetMaxIdleConns(2)
}

// HarnessFunctions name the functions of the goroutines a running server
// keeps (its log reader and process waiter), for leak checkers to ignore.
var HarnessFunctions = []string{
	"github.com/tenantpg/tenantpg/internal/pgtest.(*Server).readLog",
	"github.com/tenantpg/tenantpg/internal/pgtest.(*Server).start.func1",
}

// Stop drops what the helpers created (on an external server) or shuts the
// throwaway server down and removes its files.
func (s *Server) Stop() error {
	if s.dir == "" {
		s.dropCreated()
	}
	if s.admin != nil {
		s.admin.Close()
	}
	if s.dir != "" {
		_ = s.stopProcess(syscall.SIGINT)
		s.cleanup()
	}
	return nil
}

func (s *Server) cleanup() {
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}

func (s *Server) dropCreated() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s.createdMu.Lock()
	defer s.createdMu.Unlock()
	for _, db := range s.databases {
		_, _ = s.admin.ExecContext(ctx, "DROP DATABASE IF EXISTS "+QuoteIdent(db)+" WITH (FORCE)")
	}
	for _, r := range s.roles {
		_, _ = s.admin.ExecContext(ctx, "DROP ROLE IF EXISTS "+QuoteIdent(r))
	}
}

// Admin returns a superuser connection pool to the "postgres" database.
func (s *Server) Admin() *sql.DB { return s.admin }

// URL returns a postgres:// connection string for user and database on this
// server. sslmode=disable keeps a dial to a single round of start-up.
func (s *Server) URL(user, password, database string) string {
	u := url.URL{Scheme: "postgres", Host: net.JoinHostPort(s.Host, strconv.Itoa(s.Port)), Path: "/" + database}
	if user == s.adminUser && password == "" {
		password = s.adminPass
	}
	if password != "" {
		u.User = url.UserPassword(user, password)
	} else {
		u.User = url.User(user)
	}
	u.RawQuery = "sslmode=disable"
	if s.CertFile != "" {
		u.RawQuery = url.Values{"sslmode": {"verify-full"}, "sslrootcert": {s.CertFile}}.Encode()
	}
	return u.String()
}

// writeCertificate makes a self-signed ECDSA certificate for the server's
// addresses, readable by the server's OS user, its key by that user alone
// (PostgreSQL refuses a key others can read).
func (s *Server) writeCertificate() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.ParseIP(s.Host)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	certFile, keyFile := filepath.Join(s.dir, "server.crt"), filepath.Join(s.dir, "server.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if s.runAs != nil {
		for _, f := range []string{certFile, keyFile} {
			if err := os.Chown(f, int(s.runAs.Uid), int(s.runAs.Gid)); err != nil {
				return err
			}
		}
	}
	s.CertFile, s.KeyFile = certFile, keyFile
	return nil
}

// CreateRole creates a login role (named Prefix+name) with a password and a
// CONNECTION LIMIT (-1 for none), and returns the full name. A non-superuser
// role is what makes the server enforce that limit.
func (s *Server) CreateRole(ctx context.Context, name, password string, connLimit int) (string, error) {
	full := s.Prefix + name
	q := fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD %s CONNECTION LIMIT %d", QuoteIdent(full), quoteLiteral(password), connLimit)
	if _, err := s.admin.ExecContext(ctx, q); err != nil {
		return "", fmt.Errorf("pgtest: create role %s: %w", full, err)
	}
	s.createdMu.Lock()
	s.roles = append(s.roles, full)
	s.createdMu.Unlock()
	return full, nil
}

// CreateDatabases creates the databases Prefix+name for each name, owned by
// owner and copied from template (template0 when empty; a full name), a few
// at a time, and returns their full names in order.
func (s *Server) CreateDatabases(ctx context.Context, owner, template string, names ...string) ([]string, error) {
	if template == "" {
		template = "template0"
	}
	full := make([]string, len(names))
	errs := make(chan error, len(names))
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for i, n := range names {
		full[i] = s.Prefix + n
		wg.Add(1)
		sem <- struct{}{}
		go func(db string) {
			defer wg.Done()
			defer func() { <-sem }()
			q := "CREATE DATABASE " + QuoteIdent(db) + " OWNER " + QuoteIdent(owner) + " TEMPLATE " + QuoteIdent(template)
			if _, err := s.admin.ExecContext(ctx, q); err != nil {
				errs <- fmt.Errorf("pgtest: create database %s: %w", db, err)
				return
			}
			s.createdMu.Lock()
			s.databases = append(s.databases, db)
			s.createdMu.Unlock()
		}(full[i])
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	return full, nil
}

// Exec runs statements as the superuser in database db (a full name).
func (s *Server) Exec(ctx context.Context, db string, sqls ...string) error {
	conn, err := sql.Open("pgx", s.URL(s.adminUser, "", db))
	if err != nil {
		return err
	}
	defer conn.Close()
	for _, q := range sqls {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			return fmt.Errorf("pgtest: %s: %w", db, err)
		}
	}
	return nil
}

// Backends returns how many client backends the server has for role right now.
func (s *Server) Backends(ctx context.Context, role string) (int, error) {
	var n int
	err := s.admin.QueryRowContext(ctx,
		"SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'", role).Scan(&n)
	return n, err
}

// PeakSampler records the most client backends the server reported for a
// role. It measures the server's own view, independent of any driver.
type PeakSampler struct {
	peak, samples atomic.Int64
	stop, done    chan struct{}
	stopOnce      sync.Once
}

// SamplePeak polls pg_stat_activity for role every interval until Stop.
func (s *Server) SamplePeak(role string, interval time.Duration) *PeakSampler {
	p := &PeakSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				if n, err := s.Backends(context.Background(), role); err == nil {
					p.samples.Add(1)
					if int64(n) > p.peak.Load() {
						p.peak.Store(int64(n))
					}
				}
			}
		}
	}()
	return p
}

// Peak returns the highest count seen so far.
func (p *PeakSampler) Peak() int { return int(p.peak.Load()) }

// Stop ends sampling and returns the peak and how many samples were taken.
// It may be called again, from a test's cleanup after a failed assertion.
func (p *PeakSampler) Stop() (peak, samples int) {
	p.stopOnce.Do(func() { close(p.stop) })
	<-p.done
	return p.Peak(), int(p.samples.Load())
}

// TerminateBackends terminates every client backend of role and returns how
// many it signalled.
func (s *Server) TerminateBackends(ctx context.Context, role string) (int, error) {
	var n int
	err := s.admin.QueryRowContext(ctx,
		"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
		role).Scan(&n)
	return n, err
}

// QuoteIdent quotes an SQL identifier.
func QuoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

func quoteLiteral(s string) string { return `'` + strings.ReplaceAll(s, `'`, `''`) + `'` }

var (
	mainServer *Server
	mainErr    error
)

// Main starts one server for a test binary, runs its tests and stops the
// server. Use it from TestMain: os.Exit(pgtest.Main(m, opts)). When no
// PostgreSQL can be found the tests run and each one that calls Require
// skips, saying how to get one; when the CI environment variable is set that
// is a failure instead, so that a missing server can never pass CI. With
// -short no server is started, CI or not, and the tests that call Require
// skip: go test -short is the quick run of the tests that need no server.
func Main(m *testing.M, opts Options) int {
	if !flag.Parsed() {
		flag.Parse()
	}
	mainServer, mainErr = Start(opts)
	if errors.Is(mainErr, ErrShort) {
		return m.Run()
	}
	if mainErr != nil {
		if os.Getenv("CI") != "" {
			fmt.Fprintln(os.Stderr, "FAIL: CI is set and no PostgreSQL is available:", mainErr)
			return 1
		}
		fmt.Fprintln(os.Stderr, "pgtest: tests that need PostgreSQL will skip:", mainErr)
	}
	code := m.Run()
	if mainServer != nil {
		_ = mainServer.Stop()
	}
	return code
}

// Require returns the server started by Main, or skips the test when there
// is none (in -short mode, always).
func Require(t testing.TB) *Server {
	t.Helper()
	if mainServer == nil {
		if shortMode() {
			t.Skip(ErrShort.Error())
		}
		if mainErr == nil {
			mainErr = errors.New("pgtest.Main was not called from TestMain")
		}
		t.Skip(mainErr.Error())
	}
	return mainServer
}
