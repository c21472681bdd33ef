package tenantpg

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// Ids cannot redirect a connection (#20, item 4).

// TestDatabaseNameOver63BytesRefused: PostgreSQL truncates a database name
// in the start-up packet to 63 bytes, so a 64-byte name reaches the
// database of the 63 bytes it starts with, another workspace's. Every path
// that takes a name refuses it, naming the workspace and never the DSN or
// its password: OpenDB, the resolver's DSN and the registry.
func TestDatabaseNameOver63BytesRefused(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2})
	ctx := context.Background()
	pad := maxIdentifierLen - len(e.srv.Prefix) - len("n63_")
	names, err := e.srv.CreateDatabases(ctx, e.role, "", "n63_"+strings.Repeat("x", pad))
	require.NoError(t, err)
	victim := names[0]
	require.Len(t, victim, maxIdentifierLen)
	long := victim + "y" // truncated by the server onto victim

	// At the limit: the name is used as is.
	db, err := e.drv.OpenDB(e.srv.URL(e.role, testPassword, victim))
	require.NoError(t, err)
	require.Equal(t, victim, currentDB(t, ctx, db))
	require.NoError(t, db.Close())

	refused := func(t *testing.T, err error, workspace string) {
		t.Helper()
		var de *DSNError
		require.ErrorAs(t, err, &de)
		require.Equal(t, workspace, de.Workspace)
		require.ErrorContains(t, err, "64 bytes")
		require.NotContains(t, err.Error(), testPassword)
		require.NotContains(t, err.Error(), "postgres://")
	}

	// OpenDB of a plain DSN.
	db, err = e.drv.OpenDB(e.srv.URL(e.role, testPassword, long) + "&workspace=wlong")
	if err == nil {
		t.Errorf("OpenDB accepted a 64-byte name; it reached database %q", currentDB(t, ctx, db))
		db.Close()
	} else {
		refused(t, err, "wlong")
	}

	// The resolver's DSN, under a {workspace} *sql.DB.
	require.NoError(t, e.drv.Configure(Config{MaxConnections: 2, ResolveWorkspace: func(_ context.Context, id string) (string, error) {
		if id == "legacy" {
			return e.srv.URL(e.role, testPassword, long), nil
		}
		return "", nil
	}}))
	routed := e.openRouted()
	var name string
	err = routed.QueryRowContext(WithWorkspace(ctx, "legacy"), "SELECT current_database()").Scan(&name)
	require.Error(t, err, "the resolver's 64-byte name reached database %q", name)
	refused(t, err, "legacy")

	// The registry, with a DSN callback.
	reg, err := NewWorkspaces(WorkspacesConfig{Driver: e.drv, DSN: func(id string) (string, error) {
		return e.srv.URL(e.role, testPassword, long), nil
	}})
	require.NoError(t, err)
	defer reg.Close()
	db, err = reg.DB(ctx, "wreg")
	if err == nil {
		t.Errorf("the registry accepted a 64-byte name; it reached database %q", currentDB(t, ctx, db))
	} else {
		refused(t, err, "wreg")
		require.ErrorContains(t, err, `workspace "wreg"`)
	}
	e.requireQuiescent()
}

// TestRoutedTemplateTooLongForAnyID: a {workspace} DSN whose name leaves no
// room for an id of one byte is refused when it is opened, not at each call.
func TestRoutedTemplateTooLongForAnyID(t *testing.T) {
	drv, err := NewDriver(Config{MaxConnections: 2})
	require.NoError(t, err)
	defer drv.Close()
	for _, n := range []int{maxIdentifierLen - 1, maxIdentifierLen} {
		dsn := fmt.Sprintf("postgres://app:%s@db.invalid/%s%s", testPassword, strings.Repeat("w", n), WorkspacePlaceholder)
		c, err := drv.OpenConnector(dsn)
		if n == maxIdentifierLen-1 {
			require.NoError(t, err, "room for a one-byte id")
			require.NoError(t, c.(*router).Close())
			continue
		}
		require.ErrorContains(t, err, "for any workspace")
		require.NotContains(t, err.Error(), testPassword)
		var de *DSNError
		require.True(t, errors.As(err, &de))
	}
}

// fakeServer is a TCP listener that speaks just enough of PostgreSQL's
// start-up to ask for a cleartext password, and records every password it
// is sent: where a redirected connection would hand its credentials.
type fakeServer struct {
	ln        net.Listener
	port      int
	passwords chan string
	done      chan struct{}
}

func startFakeServer(t *testing.T) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f := &fakeServer{ln: ln, port: ln.Addr().(*net.TCPAddr).Port, passwords: make(chan string, 16), done: make(chan struct{})}
	go func() {
		defer close(f.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.serve(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-f.done
	})
	return f
}

func (f *fakeServer) serve(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var n uint32
	if binary.Read(c, binary.BigEndian, &n) != nil || n < 8 || n > 10000 {
		return
	}
	if _, err := io.CopyN(io.Discard, c, int64(n-4)); err != nil {
		return
	}
	// AuthenticationCleartextPassword.
	if _, err := c.Write([]byte{'R', 0, 0, 0, 8, 0, 0, 0, 3}); err != nil {
		return
	}
	var hdr [5]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil || hdr[0] != 'p' {
		return
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
	if _, err := io.ReadFull(c, body); err != nil {
		return
	}
	select {
	case f.passwords <- strings.TrimRight(string(body), "\x00"):
	default: // enough recorded to fail the test
	}
}

// received returns the passwords sent so far.
func (f *fakeServer) received() []string {
	var got []string
	for {
		select {
		case p := <-f.passwords:
			got = append(got, p)
		default:
			return got
		}
	}
}

// TestWorkspaceIDCannotRedirect: an id that holds a DSN's syntax
// (x?sslmode=disable&host=...&port=...) sent the password, through the
// Example's concatenating DSN callback, to the host it named. With Pattern
// it is a database name, looked up on the pattern's server; the DSN
// callback is not given it; the router and the Open hook keep it in the
// database name too.
func TestWorkspaceIDCannotRedirect(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2})
	fake := startFakeServer(t)
	ctx := context.Background()
	// The x?host=evil&sslmode=disable# in a form pgx 5.12 parses
	// after the callback's own "?sslmode=disable": the trailing &a swallows
	// that as a parameter named a?sslmode.
	hostile := fmt.Sprintf("x?sslmode=disable&host=127.0.0.1&port=%d&a", fake.port)
	prefix := strings.TrimSuffix(e.dbs[0], "ws0")
	addr := net.JoinHostPort(e.srv.Host, strconv.Itoa(e.srv.Port))

	// The callback of the Example before Pattern: the id spliced into the
	// text.
	spliced, err := NewWorkspaces(WorkspacesConfig{Driver: e.drv, DSN: func(id string) (string, error) {
		return "postgres://" + e.role + ":" + testPassword + "@" + addr + "/" + prefix + id + "?sslmode=disable", nil
	}})
	require.NoError(t, err)
	defer spliced.Close()
	db, err := spliced.DB(ctx, hostile)
	if err == nil {
		// The fake server ends each connection after the password, which
		// the driver takes for a server down and retries until the deadline.
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		var one int
		_ = db.QueryRowContext(qctx, "SELECT 1").Scan(&one)
		cancel()
	} else {
		require.ErrorContains(t, err, "use WorkspacesConfig.Pattern")
		require.NotContains(t, err.Error(), testPassword)
	}
	require.Empty(t, fake.received(), "the DSN callback's id sent the password to the host it named")
	db, err = spliced.DB(ctx, "ws0")
	require.NoError(t, err, "an id of unreserved characters still reaches the callback")
	require.Equal(t, e.dbs[0], currentDB(t, ctx, db))

	// Pattern: the id is the database name and nothing else.
	pattern := e.srv.URL(e.role, testPassword, prefix+WorkspacePlaceholder)
	reg, err := NewWorkspaces(WorkspacesConfig{Driver: e.drv, Pattern: pattern})
	require.NoError(t, err)
	defer reg.Close()
	db, err = reg.DB(ctx, "ws0")
	require.NoError(t, err)
	require.Equal(t, e.dbs[0], currentDB(t, ctx, db))
	db, err = reg.DB(ctx, hostile)
	require.NoError(t, err, "any id validWorkspace accepts is a database name")
	var one int
	err = db.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr, "the pattern's server answered")
	require.Equal(t, "3D000", pgErr.Code, "no database of that name on the pattern's server")
	require.NotContains(t, err.Error(), testPassword)

	// The router: the same after-parsing substitution.
	routed := e.openRouted()
	err = routed.QueryRowContext(WithWorkspace(ctx, hostile), "SELECT 1").Scan(&one)
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "3D000", pgErr.Code)

	// The Open hook gets the pattern's text with the id escaped in it,
	// which parses to the pattern's server, user and settings.
	var opened []string
	hooked, err := NewWorkspaces(WorkspacesConfig{Driver: e.drv, Pattern: pattern, Open: func(dsn string) (*sql.DB, error) {
		opened = append(opened, dsn)
		return e.drv.OpenDB(dsn)
	}})
	require.NoError(t, err)
	defer hooked.Close()
	db, err = hooked.DB(ctx, hostile)
	require.NoError(t, err)
	err = db.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "3D000", pgErr.Code)
	require.Len(t, opened, 1)
	cfg, err := pgx.ParseConfig(opened[0])
	require.NoError(t, err)
	require.Equal(t, prefix+hostile, cfg.Database)
	require.Equal(t, e.srv.Host, cfg.Host)
	require.Equal(t, uint16(e.srv.Port), cfg.Port)

	require.Empty(t, fake.received(), "no id may send the password elsewhere")
	require.NoError(t, spliced.Close())
	require.NoError(t, reg.Close())
	require.NoError(t, hooked.Close())
}

// TestWorkspaceIDsValidatedWhereTheyEnter: the registry's DB and
// CloseWorkspace, and the router, refuse an id that cannot be a workspace
// (empty, a NUL or other control character, too long, not UTF-8) before any
// hook sees it, and the error names the id, clipped, never the DSN.
func TestWorkspaceIDsValidatedWhereTheyEnter(t *testing.T) {
	var dsnCalls int
	spliced, err := NewWorkspaces(WorkspacesConfig{DSN: func(id string) (string, error) {
		dsnCalls++
		return mockDSN(id)
	}, Open: func(string) (*sql.DB, error) { return nil, errors.New("not reached") }})
	require.NoError(t, err)
	defer spliced.Close()
	pattern, err := NewWorkspaces(WorkspacesConfig{Pattern: "postgres://app:" + mockPassword + "@db.invalid/ws_{workspace}",
		Open: func(string) (*sql.DB, error) { return nil, errors.New("not reached") }})
	require.NoError(t, err)
	defer pattern.Close()
	drv, err := NewDriver(Config{MaxConnections: 2})
	require.NoError(t, err)
	defer drv.Close()
	c, err := drv.OpenConnector("postgres://app:" + mockPassword + "@db.invalid/ws_{workspace}")
	require.NoError(t, err)
	r := c.(*router)
	defer r.Close()

	ctx := context.Background()
	for _, id := range []string{"", "a\x00b", "a\nb", strings.Repeat("x", maxWorkspaceLen+1), "\xff"} {
		for _, w := range []*Workspaces{spliced, pattern} {
			_, err := w.DB(ctx, id)
			var de *DSNError
			require.ErrorAs(t, err, &de, "%q", id)
			require.LessOrEqual(t, len(de.Workspace), 70, "the id is clipped")
			require.NotContains(t, err.Error(), mockPassword)
			require.ErrorAs(t, w.CloseWorkspace(id), &de, "%q", id)
		}
		_, err := r.params(ctx, id)
		require.Error(t, err, "%q", id)
	}
	_, err = pattern.DB(ctx, strings.Repeat("y", maxIdentifierLen))
	require.ErrorContains(t, err, "PostgreSQL truncates names beyond 63")
	require.Zero(t, dsnCalls, "no hook sees an id that was refused")

	// The DSN callback is not given ids of a DSN's syntax; Pattern takes them.
	for _, id := range []string{"x?host=evil&sslmode=disable#", "a/b", "a?b", "a#b", "a&b", "a=b", "a b", "a'b", `a\b`, "a@b", "a:b", "a%41"} {
		_, err := spliced.DB(ctx, id)
		require.ErrorContains(t, err, "use WorkspacesConfig.Pattern", "%q", id)
		_, err = pattern.DB(ctx, id)
		require.ErrorContains(t, err, "not reached", "%q reaches Pattern's Open hook", id)
	}
	_, err = spliced.DB(ctx, "Ünïcødé-ws_1.~")
	require.ErrorContains(t, err, "not reached")
	require.Equal(t, 1, dsnCalls)
}

// TestWorkspacesPatternConfig: Pattern and DSN are exclusive, and a Pattern
// is parsed once, at NewWorkspaces, without its password in any error.
func TestWorkspacesPatternConfig(t *testing.T) {
	for _, cfg := range []WorkspacesConfig{
		{},
		{Pattern: "postgres://app@db/ws_{workspace}", DSN: mockDSN},
	} {
		_, err := NewWorkspaces(cfg)
		require.ErrorContains(t, err, "set Pattern or DSN")
	}
	for pattern, want := range map[string]string{
		"postgres://app:" + mockPassword + "@db/ws_fixed":                   "no {workspace} placeholder",
		"postgres://app:" + mockPassword + "@db:notaport/ws_{workspace}":    "invalid port",
		"postgres://app:" + mockPassword + "@{workspace}/ws":                "only in the database name",
		"postgres://app:" + mockPassword + "@db/ws_{workspace}?workspace=x": "workspace parameter cannot be used",
	} {
		_, err := NewWorkspaces(WorkspacesConfig{Pattern: pattern})
		var ce *ConfigError
		require.ErrorAs(t, err, &ce, pattern)
		require.ErrorContains(t, err, want)
		require.NotContains(t, err.Error(), mockPassword)
	}
}

// spliceCallbacks are DSN callbacks as applications write them: the id
// spliced into the database name (prefix + id) of a URL or keyword/value
// DSN.
var spliceCallbacks = []struct {
	dsn    func(id string) string
	prefix string
}{
	{func(id string) string {
		return "postgres://app:pw@db:5432/ws_" + id + "?sslmode=disable&application_name=svc"
	}, "ws_"},
	{func(id string) string { return "postgres://app:pw@db:5432/" + id }, ""},
	{func(id string) string { return "postgresql://app:pw@db/ws_" + id + "?workspace=" + id }, "ws_"},
	{func(id string) string { return "host=db user=app password=pw dbname=ws_" + id + " sslmode=disable" }, "ws_"},
	{func(id string) string { return "host=db user=app password=pw dbname='ws_" + id + "' sslmode=disable" }, "ws_"},
	{func(id string) string { return "host=db port=5433 user=app password=pw dbname=" + id }, ""},
}

// requireOnlyDatabase fails unless got connects as want does, to database
// name: this test's own comparison, apart from sameButDatabase.
func requireOnlyDatabase(t *testing.T, want, got *pgx.ConnConfig, name, what string) {
	t.Helper()
	type view struct {
		Host, User, Password, Database string
		Port                           uint16
		TLS                            bool
		ServerName                     string
		Fallbacks                      []string
		Params                         map[string]string
		Timeout                        time.Duration
		ExecMode                       pgx.QueryExecMode
		Cache                          int
		Validate                       bool
	}
	v := func(c *pgx.ConnConfig, db string) view {
		w := view{Host: c.Host, User: c.User, Password: c.Password, Database: db, Port: c.Port, TLS: c.TLSConfig != nil,
			Params: c.RuntimeParams, Timeout: c.ConnectTimeout, ExecMode: c.DefaultQueryExecMode,
			Cache: c.StatementCacheCapacity, Validate: c.ValidateConnect != nil}
		if c.TLSConfig != nil {
			w.ServerName = c.TLSConfig.ServerName
		}
		for _, fb := range c.Fallbacks {
			w.Fallbacks = append(w.Fallbacks, fmt.Sprintf("%s:%d tls=%t", fb.Host, fb.Port, fb.TLSConfig != nil))
		}
		return w
	}
	if a, b := v(want, name), v(got, got.Database); !reflect.DeepEqual(a, b) {
		t.Fatalf("%s: an id changed more than the database name:\nwant %+v\ngot  %+v", what, a, b)
	}
}

// FuzzWorkspaceID: for any pattern and id, a workspace's connection
// settings are the pattern's but for the database name, which is the
// pattern's with the id in it, within 63 bytes; or the id is refused. That
// holds for the router's and the registry's substitution, for the text the
// Open hook gets, and for ids given to a DSN callback that splices them.
// Its seed corpus runs with the normal tests; fuzz with
//
//	go test -short -run '^$' -fuzz FuzzWorkspaceID .
func FuzzWorkspaceID(f *testing.F) {
	patterns := []string{
		"postgres://app:pw@db.internal:5432/ws_{workspace}?sslmode=disable&application_name=svc",
		"postgresql://app:pw@h1:5432,h2:5433/ws_%7Bworkspace%7D?sslmode=prefer&options=-c%20app.tenant%3D1",
		"postgres://app:pw@db/{workspace}?pool_max_conns=2&default_query_exec_mode=exec",
		"host=db user=app password=pw dbname=ws_{workspace} sslmode=disable",
		"host=db user=app password='p w' dbname='ws {workspace}' sslmode=require target_session_attrs=read-write",
		"host=/tmp port=5433 user=app dbname={workspace}_db",
	}
	ids := []string{
		"abc", "x?host=evil&sslmode=disable#", "x?sslmode=disable&host=evil&port=1&a", "x' host=evil",
		"x host=evil", `x\' host=evil`, "a/b", "%41", "ü", "x&password=p", "x#", "", "a\x00b", "é~._-",
		strings.Repeat("z", 70),
	}
	for i, p := range patterns {
		for j, id := range ids {
			if (i+j)%2 == 0 || j < 3 {
				f.Add(p, id)
			}
		}
	}
	f.Fuzz(func(t *testing.T, pattern, id string) {
		valid := validWorkspace(id) == ""
		for _, cb := range spliceCallbacks {
			if !valid || spliceSafe(id) != "" {
				break // DB refuses it before the callback sees it
			}
			base, err := parseDSN(cb.dsn("w"))
			if err != nil {
				t.Fatalf("callback template does not parse: %v", err)
			}
			p, err := parseDSN(cb.dsn(id))
			if err != nil {
				continue // refused: no connection at all
			}
			requireOnlyDatabase(t, base.cfg, p.cfg, cb.prefix+id, "DSN callback "+cb.dsn("{id}"))
		}

		tmpl, err := parseDSN(pattern)
		if err != nil || !tmpl.routed {
			return
		}
		if !valid {
			return // refused where it enters (TestWorkspaceIDsValidatedWhereTheyEnter)
		}
		name := strings.ReplaceAll(tmpl.cfg.Database, WorkspacePlaceholder, id)
		p, err := substitute(tmpl, id)
		if err != nil {
			if len(name) <= maxIdentifierLen {
				t.Fatalf("id %q refused with a %d-byte name: %v", id, len(name), err)
			}
			return
		}
		if len(p.cfg.Database) > maxIdentifierLen {
			t.Fatalf("a %d-byte name accepted", len(p.cfg.Database))
		}
		requireOnlyDatabase(t, tmpl.cfg, p.cfg, name, "substitute")
		if p.workspace != id {
			t.Fatalf("label %q, want the id %q", p.workspace, id)
		}
		dsn, err := spliceDSN(pattern, tmpl, p)
		if err != nil {
			return // refused for the Open hook
		}
		got, err := pgx.ParseConfig(dsn)
		if err != nil {
			t.Fatalf("spliceDSN's text does not parse: %v", err)
		}
		for _, k := range []string{paramWorkspace, paramMaxConns, paramReserved} {
			delete(got.RuntimeParams, k) // tenantpg's, which parseDSN takes out of the pattern too
		}
		requireOnlyDatabase(t, tmpl.cfg, got, name, "the Open hook's DSN")
	})
}
