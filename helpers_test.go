package tenantpg

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// testMaxConnections is the throwaway server's max_connections: small, so
// that tests which exceed it are really refused.
const testMaxConnections = 60

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, pgtest.Options{MaxConnections: testMaxConnections}))
}

const testPassword = "s3cr3t-Pa55w0rd-xyzzy"

var envSeq atomic.Int64

// env is one test's world: a role whose CONNECTION LIMIT equals the budget,
// so the server itself refuses any connection beyond it, databases owned by
// that role, and a driver with its own budget.
type env struct {
	t    testing.TB
	srv  *pgtest.Server
	role string
	dbs  []string
	drv  *Driver
}

// newEnv creates n databases (each with a table kv(id int primary key, v
// text) holding ids 1..10) and a driver with cfg.
func newEnv(t testing.TB, n int, cfg Config) *env {
	t.Helper()
	srv := pgtest.Require(t)
	// Registered first, so it runs last: after the driver and every *sql.DB
	// of the test are closed, nothing the test started may still run.
	ignore := []goleak.Option{goleak.IgnoreCurrent()}
	for _, f := range pgtest.HarnessFunctions { // a server restarted by the test
		ignore = append(ignore, goleak.IgnoreAnyFunction(f))
	}
	t.Cleanup(func() {
		srv.DropIdleAdminConns()
		goleak.VerifyNone(t, ignore...)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	id := envSeq.Add(1)
	cfgN, err := cfg.normalize()
	require.NoError(t, err)
	role, err := srv.CreateRole(ctx, fmt.Sprintf("app%d", id), testPassword, cfgN.MaxConnections)
	require.NoError(t, err)
	tpl, err := srv.CreateDatabases(ctx, role, "", fmt.Sprintf("tpl%d", id))
	require.NoError(t, err)
	require.NoError(t, srv.Exec(ctx, tpl[0],
		"CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL)",
		"INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 10) g",
		"ALTER TABLE kv OWNER TO "+pgtest.QuoteIdent(role)))
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("e%d_ws%d", id, i)
	}
	dbs, err := srv.CreateDatabases(ctx, role, tpl[0], names...)
	require.NoError(t, err)
	drv, err := NewDriver(cfg)
	require.NoError(t, err)
	e := &env{t: t, srv: srv, role: role, dbs: dbs, drv: drv}
	t.Cleanup(func() { drv.Close() })
	return e
}

// setRoleLimit sets the CONNECTION LIMIT of the env's role on the server.
func (e *env) setRoleLimit(n int) {
	e.t.Helper()
	_, err := e.srv.Admin().ExecContext(context.Background(), fmt.Sprintf("ALTER ROLE %s CONNECTION LIMIT %d", pgtest.QuoteIdent(e.role), n))
	require.NoError(e.t, err)
}

// dsn returns a URL DSN for database i with extra query parameters.
func (e *env) dsn(i int, params ...string) string {
	u := e.srv.URL(e.role, testPassword, e.dbs[i])
	for _, p := range params {
		u += "&" + p
	}
	return u
}

// open opens database i through the env's driver with OpenDB limits.
func (e *env) open(i int, params ...string) *sql.DB {
	e.t.Helper()
	db, err := e.drv.OpenDB(e.dsn(i, append([]string{fmt.Sprintf("workspace=ws%d", i)}, params...)...))
	require.NoError(e.t, err)
	e.t.Cleanup(func() { db.Close() })
	return db
}

// backends is what the server reports for the env's role.
func (e *env) backends() int {
	e.t.Helper()
	n, err := e.srv.Backends(context.Background(), e.role)
	require.NoError(e.t, err)
	return n
}

// requireQuiescent checks the accounting invariant once nothing is in
// flight: tokens held == connections the driver holds == backends the server
// reports for the role.
func (e *env) requireQuiescent() {
	e.t.Helper()
	var s Stats
	quiet := func() bool {
		s = e.drv.Stats()
		return s.Dialing == 0 && s.Closing == 0 && s.Waiting == 0 && s.InUse == 0 && e.backends() == s.Open
	}
	deadline := time.Now().Add(10 * time.Second)
	for !quiet() {
		if time.Now().After(deadline) {
			e.t.Fatalf("not quiescent: server backends %d, budget:\n%s", e.backends(), e.drv.dumpState())
		}
		time.Sleep(5 * time.Millisecond)
	}
	require.Equal(e.t, s.Open, s.Idle, "open tokens must all be idle backends at quiescence")
	sum := 0
	for _, d := range s.Databases {
		sum += d.Open
		require.LessOrEqual(e.t, d.Open, d.Cap, "database %s over its cap", d.Workspace)
	}
	require.Equal(e.t, s.Open, sum, "per-database opens must add up to the budget's")
	b := e.drv.b
	b.mu.Lock()
	err := b.checkInvariantsLocked()
	b.mu.Unlock()
	require.NoError(e.t, err)
}

// samplePeak measures the most backends the server reports for the role.
func (e *env) samplePeak() *pgtest.PeakSampler {
	p := e.srv.SamplePeak(e.role, 2*time.Millisecond)
	e.t.Cleanup(func() { p.Stop() }) // registered after the leak check: runs before it, even after a failure
	return p
}

// errCollector records errors from many goroutines.
type errCollector struct {
	mu   sync.Mutex
	errs []error
}

func (c *errCollector) add(err error) {
	if err == nil {
		return
	}
	c.mu.Lock()
	c.errs = append(c.errs, err)
	c.mu.Unlock()
}

func (c *errCollector) list() []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]error(nil), c.errs...)
}

// e2eWait and pollEvery bound the waits for asynchronous effects that the
// tests observe through Stats or the server (a socket drained, a timer run).
const (
	e2eWait   = 10 * time.Second
	pollEvery = 2 * time.Millisecond
)

// addPoolLocked registers a pool in b as register would, without a DSN,
// holding idle backends last checked in at at (a server-free budget's
// world, for the manual-clock tests and the benchmarks).
func addPoolLocked(b *budget, srv serverKey, name, workspace string, idle int, at time.Time) *backendPool {
	p := &backendPool{name: name, workspace: workspace, refs: 1, srv: b.serverLocked(srv)}
	p.srv.pools.pushBack(p)
	for range idle {
		addIdleLocked(b, p, at)
	}
	return p
}

// addIdleLocked gives p an idle backend, as if dialed and checked in at at.
func addIdleLocked(b *budget, p *backendPool, at time.Time) *backend {
	s := p.srv
	b.takeLocked(p)
	s.ledger.dialed(&p.tokens)
	s.ledger.park(&p.tokens)
	be := &backend{db: p, tok: &token{db: p}, created: at, state: backendIdle, idleSince: at}
	p.idleBackends.pushFront(be)
	s.recency.touch(p)
	return be
}

// readLoad starts workers that read a row from dbs in turn, each read with
// a 10 s deadline, counting successes in ok and collecting failures in
// errs, and returns the function that stops them and waits.
func readLoad(dbs []*sql.DB, workers int, ok *atomic.Int64, errs *errCollector) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for g := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ctx.Err() == nil; n++ {
				qctx, cancelRead := context.WithTimeout(context.Background(), 10*time.Second)
				var v string
				err := dbs[(g+n)%len(dbs)].QueryRowContext(qctx, "SELECT v FROM kv WHERE id = 2").Scan(&v)
				cancelRead()
				if err != nil {
					errs.add(err)
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

// syncBuffer is a buffer that a logger writes to while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
