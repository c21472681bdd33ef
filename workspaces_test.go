package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestWorkspacesOpenEachOnce(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 4})
	var dsnCalls atomic.Int64
	ws, err := NewWorkspaces(WorkspacesConfig{Driver: e.drv, DSN: func(id string) (string, error) {
		dsnCalls.Add(1)
		var i int
		if _, err := fmt.Sscanf(id, "w%d", &i); err != nil || i >= len(e.dbs) {
			return "", errors.New("no such workspace")
		}
		return e.dsn(i, "workspace="+id), nil
	}})
	require.NoError(t, err)
	defer ws.Close()
	ctx := context.Background()

	var wg sync.WaitGroup
	got := make([]*sql.DB, 16)
	for g := range got {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			db, err := ws.DB(ctx, "w1")
			require.NoError(t, err)
			got[g] = db
		}(g)
	}
	wg.Wait()
	for _, db := range got {
		require.Same(t, got[0], db)
	}
	require.Equal(t, int64(1), dsnCalls.Load(), "concurrent first calls open the workspace once")
	queryOne(t, got[0])
	require.Equal(t, 0, got[0].Stats().MaxOpenConnections, "opened through OpenDB: the driver queues its callers")

	_, err = ws.DB(ctx, "w9")
	require.ErrorContains(t, err, `workspace "w9"`)
	_, err = ws.DB(ctx, "w9")
	require.Error(t, err)
	require.Equal(t, int64(3), dsnCalls.Load(), "a failed opening is not remembered")

	require.NoError(t, ws.CloseWorkspace("w1"))
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 }, e2eWait, pollEvery)
	again, err := ws.DB(ctx, "w1")
	require.NoError(t, err)
	require.NotSame(t, got[0], again)
	queryOne(t, again)

	require.NoError(t, ws.Close())
	_, err = ws.DB(ctx, "w0")
	require.ErrorIs(t, err, ErrWorkspacesClosed)
	e.requireQuiescent()
	require.Zero(t, e.drv.Stats().Open, "closing the registry gives every token back")
}

var lazyRuns atomic.Int64

func TestWorkspacesCreateIfMissing(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	var created atomic.Int64
	names := map[string]string{}
	var mu sync.Mutex
	ws, err := NewWorkspaces(WorkspacesConfig{
		Driver: e.drv,
		DSN: func(id string) (string, error) {
			mu.Lock()
			defer mu.Unlock()
			name := e.srv.Prefix + "lazy_" + id
			names[id] = name
			return strings.Replace(e.dsn(0, "workspace="+id), e.dbs[0], name, 1), nil
		},
		CreateIfMissing: func(ctx context.Context, id string) error {
			created.Add(1)
			mu.Lock()
			name := names[id]
			mu.Unlock()
			_, err := e.srv.CreateDatabases(ctx, e.role, "", strings.TrimPrefix(name, e.srv.Prefix))
			return err
		},
	})
	require.NoError(t, err)
	defer ws.Close()

	// A new workspace per run: the database outlives the test, and -count
	// would find it created already.
	id := fmt.Sprintf("fresh%d", lazyRuns.Add(1))
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			db, err := ws.DB(ctx, id)
			require.NoError(t, err)
			var one int
			require.NoError(t, db.QueryRowContext(ctx, "SELECT 1").Scan(&one))
		}()
	}
	wg.Wait()
	require.Equal(t, int64(1), created.Load(), "the database is created once")
	require.NoError(t, ws.Close())
	e.requireQuiescent()
}

// The tests below need no server (they run under -short): WorkspacesConfig.Open
// hands the registry go-sqlmock databases, one per opening. The budget's
// part stays tested against a real server above.

const mockPassword = "mock-Pa55w0rd-plugh"

// mockOpener is a WorkspacesConfig.Open hook: every call opens a fresh
// sqlmock database, lets prepare add expectations, and records it.
type mockOpener struct {
	t       *testing.T
	ping    bool // sqlmock.MonitorPingsOption: pings need ExpectPing
	prepare func(dsn string, m sqlmock.Sqlmock)
	fail    error // returned instead of a database, when set
	enter   chan string
	release chan struct{} // when set, Open waits for it after entering

	mu    sync.Mutex
	mocks map[string][]sqlmock.Sqlmock // by DSN, in opening order
}

func newMockOpener(t *testing.T, prepare func(dsn string, m sqlmock.Sqlmock)) *mockOpener {
	t.Helper()
	// Every *sql.DB the test opens must be closed by the registry, or its
	// connection opener goroutine outlives the test.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	return &mockOpener{t: t, prepare: prepare, mocks: map[string][]sqlmock.Sqlmock{}}
}

func (o *mockOpener) Open(dsn string) (*sql.DB, error) {
	if o.enter != nil {
		o.enter <- dsn
	}
	if o.release != nil {
		<-o.release
	}
	if o.fail != nil {
		return nil, o.fail
	}
	db, m, err := sqlmock.New(sqlmock.MonitorPingsOption(o.ping))
	if err != nil {
		return nil, err
	}
	if o.prepare != nil {
		o.prepare(dsn, m)
	}
	o.mu.Lock()
	o.mocks[dsn] = append(o.mocks[dsn], m)
	o.mu.Unlock()
	return db, nil
}

// opened returns the mocks opened for dsn so far.
func (o *mockOpener) opened(dsn string) []sqlmock.Sqlmock {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]sqlmock.Sqlmock(nil), o.mocks[dsn]...)
}

// met checks that every mock opened so far had all its expectations met.
func (o *mockOpener) met() {
	o.t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	for dsn, ms := range o.mocks {
		for i, m := range ms {
			require.NoError(o.t, m.ExpectationsWereMet(), "%s, opening %d", dsn, i)
		}
	}
}

func mockDSN(id string) (string, error) {
	return "postgres://app:" + mockPassword + "@db.invalid/app_ws_" + id + "?workspace=" + id, nil
}

func TestWorkspacesMockOpenEachOnce(t *testing.T) {
	o := newMockOpener(t, func(dsn string, m sqlmock.Sqlmock) {
		m.ExpectQuery("SELECT 1").WillReturnRows(sqlmock.NewRows([]string{"?column?"}).AddRow(1))
		m.ExpectClose()
	})
	o.enter = make(chan string, 2)
	o.release = make(chan struct{})
	var dsnCalls atomic.Int64
	ws, err := NewWorkspaces(WorkspacesConfig{Open: o.Open, DSN: func(id string) (string, error) {
		dsnCalls.Add(1)
		return mockDSN(id)
	}})
	require.NoError(t, err)
	ctx := context.Background()

	const callers = 16
	var started, wg sync.WaitGroup
	got := map[string][]*sql.DB{"w1": make([]*sql.DB, callers), "w2": make([]*sql.DB, callers)}
	for id, dbs := range got {
		for g := range dbs {
			started.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				started.Done()
				db, err := ws.DB(ctx, id)
				require.NoError(t, err)
				dbs[g] = db
			}()
		}
	}
	// Both openings are under way, and held, while the other callers arrive.
	entered := map[string]bool{<-o.enter: true, <-o.enter: true}
	started.Wait()
	time.Sleep(10 * time.Millisecond)
	close(o.release)
	wg.Wait()
	w1, _ := mockDSN("w1")
	w2, _ := mockDSN("w2")
	require.Equal(t, map[string]bool{w1: true, w2: true}, entered, "two workspaces open side by side")
	for _, dbs := range got {
		for _, db := range dbs {
			require.Same(t, dbs[0], db)
		}
	}
	require.NotSame(t, got["w1"][0], got["w2"][0])
	require.Len(t, o.opened(w1), 1, "concurrent first calls open the workspace once")
	require.Len(t, o.opened(w2), 1)
	require.Equal(t, int64(2), dsnCalls.Load())
	for _, dbs := range got {
		var one int
		require.NoError(t, dbs[0].QueryRowContext(ctx, "SELECT 1").Scan(&one))
	}

	// CloseWorkspace closes the workspace's database (ExpectClose); the next
	// DB call opens a new one.
	o.enter, o.release = nil, nil
	require.NoError(t, ws.CloseWorkspace("w1"))
	require.NoError(t, o.opened(w1)[0].ExpectationsWereMet(), "CloseWorkspace closed the database")
	require.NoError(t, ws.CloseWorkspace("w1"), "closing a closed workspace is a no-op")
	require.NoError(t, ws.CloseWorkspace("never-opened"))
	again, err := ws.DB(ctx, "w1")
	require.NoError(t, err)
	require.NotSame(t, got["w1"][0], again)
	require.Len(t, o.opened(w1), 2)
	var one int
	require.NoError(t, again.QueryRowContext(ctx, "SELECT 1").Scan(&one))

	// Close closes every open workspace's database.
	require.NoError(t, ws.Close())
	o.met()
	_, err = ws.DB(ctx, "w1")
	require.ErrorIs(t, err, ErrWorkspacesClosed)
	require.Len(t, o.opened(w1), 2, "no opening after Close")
}

func TestWorkspacesMockErrorsNameWorkspace(t *testing.T) {
	o := newMockOpener(t, nil)
	errUnknown := errors.New("no such workspace")
	var dsnCalls atomic.Int64
	ws, err := NewWorkspaces(WorkspacesConfig{Open: o.Open, DSN: func(id string) (string, error) {
		dsnCalls.Add(1)
		if id == "w9" {
			return "", errUnknown
		}
		return mockDSN(id)
	}})
	require.NoError(t, err)
	defer ws.Close()
	ctx := context.Background()

	for range 2 {
		_, err = ws.DB(ctx, "w9")
		require.ErrorIs(t, err, errUnknown)
		require.ErrorContains(t, err, `workspace "w9"`)
		require.NotContains(t, err.Error(), mockPassword)
	}
	require.Equal(t, int64(2), dsnCalls.Load(), "a failed opening is not remembered")
	o.mu.Lock()
	require.Empty(t, o.mocks, "no DSN, no opening")
	o.mu.Unlock()

	// An error from the Open hook names the workspace too, not its DSN.
	errOpen := errors.New("open refused")
	o.fail = errOpen
	_, err = ws.DB(ctx, "w3")
	require.ErrorIs(t, err, errOpen)
	require.ErrorContains(t, err, `workspace "w3"`)
	dsn, _ := mockDSN("w3")
	require.NotContains(t, err.Error(), dsn)
	require.NotContains(t, err.Error(), mockPassword)
	o.fail = nil

	// The registry's default (the driver's OpenDB) names the workspace
	// without the DSN or its password when the DSN cannot be parsed.
	bad, err := NewWorkspaces(WorkspacesConfig{DSN: func(id string) (string, error) {
		return "postgres://app:" + mockPassword + "@db.invalid:notaport/app_ws_" + id, nil
	}})
	require.NoError(t, err)
	defer bad.Close()
	_, err = bad.DB(ctx, "w4")
	require.ErrorContains(t, err, `workspace "w4"`)
	require.NotContains(t, err.Error(), mockPassword)
}

// errNoDatabase is what PostgreSQL answers a connection to a database that
// does not exist.
func errNoDatabase(name string) error {
	return &pgconn.PgError{Severity: "FATAL", Code: "3D000", Message: fmt.Sprintf("database %q does not exist", name)}
}

func TestWorkspacesMockCreateIfMissing(t *testing.T) {
	o := newMockOpener(t, func(dsn string, m sqlmock.Sqlmock) {
		if strings.Contains(dsn, "app_ws_fresh") {
			m.ExpectPing().WillReturnError(errNoDatabase("app_ws_fresh"))
		}
		m.ExpectPing()
		m.ExpectQuery("SELECT 1").WillReturnRows(sqlmock.NewRows([]string{"?column?"}).AddRow(1))
		m.ExpectClose()
	})
	o.ping = true
	var mu sync.Mutex
	created := map[string]int{}
	ws, err := NewWorkspaces(WorkspacesConfig{
		Open: o.Open,
		DSN:  mockDSN,
		CreateIfMissing: func(ctx context.Context, id string) error {
			mu.Lock()
			defer mu.Unlock()
			created[id]++
			return nil
		},
	})
	require.NoError(t, err)
	ctx := context.Background()

	var wg sync.WaitGroup
	for _, id := range []string{"fresh", "fresh", "fresh", "fresh", "existing", "existing"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := ws.DB(ctx, id)
			require.NoError(t, err)
		}()
	}
	wg.Wait()
	for _, id := range []string{"fresh", "existing"} {
		db, err := ws.DB(ctx, id)
		require.NoError(t, err)
		var one int
		require.NoError(t, db.QueryRowContext(ctx, "SELECT 1").Scan(&one))
	}
	require.Equal(t, map[string]int{"fresh": 1}, created,
		"created once, after the ping failed with 3D000; an existing database is not created")
	require.NoError(t, ws.Close())
	o.met()
}

func TestWorkspacesMockCreateIfMissingFails(t *testing.T) {
	o := newMockOpener(t, func(dsn string, m sqlmock.Sqlmock) {
		if strings.Contains(dsn, "app_ws_down") {
			m.ExpectPing().WillReturnError(errors.New("connection refused"))
		} else {
			m.ExpectPing().WillReturnError(errNoDatabase("app_ws_fresh"))
		}
		m.ExpectClose() // the registry closes what it could not use
	})
	o.ping = true
	errCreate := errors.New("permission denied to create database")
	var creates atomic.Int64
	ws, err := NewWorkspaces(WorkspacesConfig{
		Open: o.Open,
		DSN:  mockDSN,
		CreateIfMissing: func(ctx context.Context, id string) error {
			creates.Add(1)
			return errCreate
		},
	})
	require.NoError(t, err)
	defer ws.Close()
	ctx := context.Background()

	for range 2 {
		_, err = ws.DB(ctx, "fresh")
		require.ErrorIs(t, err, errCreate)
		require.ErrorContains(t, err, `workspace "fresh": create database`)
		require.NotContains(t, err.Error(), mockPassword)
	}
	require.Equal(t, int64(2), creates.Load(), "a failed creation is not remembered")

	_, err = ws.DB(ctx, "down")
	require.ErrorContains(t, err, "connection refused")
	require.Equal(t, int64(2), creates.Load(), "only 3D000 means the database is missing")
	o.met()
}

func TestWorkspacesMockCloseWhileOpening(t *testing.T) {
	o := newMockOpener(t, func(dsn string, m sqlmock.Sqlmock) { m.ExpectClose() })
	o.enter = make(chan string, 1)
	o.release = make(chan struct{})
	ws, err := NewWorkspaces(WorkspacesConfig{Open: o.Open, DSN: mockDSN})
	require.NoError(t, err)
	ctx := context.Background()

	done := make(chan error, 1)
	go func() {
		_, err := ws.DB(ctx, "w1")
		done <- err
	}()
	dsn := <-o.enter
	closed := make(chan error, 1)
	go func() { closed <- ws.Close() }() // waits for the opening
	require.Eventually(t, func() bool {
		ws.mu.Lock()
		defer ws.mu.Unlock()
		return ws.closed
	}, 5*time.Second, time.Millisecond)
	close(o.release)
	require.ErrorIs(t, <-done, ErrWorkspacesClosed)
	require.NoError(t, <-closed)
	require.Len(t, o.opened(dsn), 1)
	o.met() // the database opened meanwhile was closed
}

func TestWorkspacesMockCloseReportsErrors(t *testing.T) {
	o := newMockOpener(t, nil) // no ExpectClose: sqlmock fails the Close
	ws, err := NewWorkspaces(WorkspacesConfig{Open: o.Open, DSN: mockDSN})
	require.NoError(t, err)
	for _, id := range []string{"w1", "w2"} {
		_, err := ws.DB(context.Background(), id)
		require.NoError(t, err)
	}
	err = ws.Close()
	require.ErrorContains(t, err, "Close was not expected")
}

// reachProbe is a context that reports when a caller first asks for its
// Done channel: a DB call does so only once it has found the workspace's
// entry and waits for it.
type reachProbe struct {
	context.Context
	reached chan struct{}
}

func newReachProbe(ctx context.Context) *reachProbe {
	return &reachProbe{Context: ctx, reached: make(chan struct{}, 1)}
}

func (p *reachProbe) Done() <-chan struct{} {
	select {
	case p.reached <- struct{}{}:
	default:
	}
	return p.Context.Done()
}

// closeWithin closes ws, failing the test if Close does not return: it
// waits for every opening, and one stuck for good would hang the test.
func closeWithin(t *testing.T, ws *Workspaces) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- ws.Close() }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(e2eWait):
		t.Fatal("Workspaces.Close did not return: an opening is stuck")
	}
}

// TestWorkspacesHookPanic: a hook that panics panics in the DB call that
// ran it; the callers waiting for that opening fail with an error naming
// the workspace and the hook instead of waiting for good, and the next
// call opens the workspace. A database opened before CreateIfMissing
// panicked is closed.
func TestWorkspacesHookPanic(t *testing.T) {
	for _, hook := range []string{"DSN", "Open", "CreateIfMissing"} {
		t.Run(hook, func(t *testing.T) {
			var opened atomic.Int64
			o := newMockOpener(t, func(dsn string, m sqlmock.Sqlmock) {
				if hook == "CreateIfMissing" && opened.Add(1) == 1 {
					// Missing; then CreateIfMissing panics and the
					// registry closes it.
					m.ExpectPing().WillReturnError(errNoDatabase("app_ws_w1"))
					m.ExpectClose()
					return
				}
				m.ExpectPing() // the registry's, for CreateIfMissing
				m.ExpectPing() // the test's
				m.ExpectClose()
			})
			o.ping = true
			var calls atomic.Int64
			entered, release := make(chan struct{}), make(chan struct{})
			maybePanic := func(name string) {
				if name == hook && calls.Add(1) == 1 {
					close(entered)
					<-release
					panic("boom in " + name)
				}
			}
			ws, err := NewWorkspaces(WorkspacesConfig{
				DSN: func(id string) (string, error) {
					maybePanic("DSN")
					return mockDSN(id)
				},
				Open: func(dsn string) (*sql.DB, error) {
					maybePanic("Open")
					return o.Open(dsn)
				},
				CreateIfMissing: func(ctx context.Context, id string) error {
					maybePanic("CreateIfMissing")
					return nil
				},
			})
			require.NoError(t, err)
			t.Cleanup(func() { closeWithin(t, ws) })

			panicked := make(chan any, 1)
			go func() {
				defer func() { panicked <- recover() }()
				_, _ = ws.DB(context.Background(), "w1")
			}()
			<-entered
			const waiters = 3
			errs := make(chan error, waiters)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			for range waiters {
				probe := newReachProbe(ctx)
				go func() {
					_, err := ws.DB(probe, "w1")
					errs <- err
				}()
				<-probe.reached
			}
			close(release)
			require.Equal(t, "boom in "+hook, <-panicked, "the panic reaches the caller that ran the hook")
			for range waiters {
				err := <-errs
				require.ErrorContains(t, err, `workspace "w1": the WorkspacesConfig.`+hook+" hook panicked")
				require.NotErrorIs(t, err, context.DeadlineExceeded, "a waiter waited for good")
			}
			db, err := ws.DB(ctx, "w1")
			require.NoError(t, err, "the next call opens the workspace")
			require.NoError(t, db.PingContext(ctx))
			closeWithin(t, ws)
			o.met() // the database opened before CreateIfMissing panicked was closed
		})
	}
}

// TestWorkspacesCloseWorkspaceDuringOpen: CloseWorkspace while the
// workspace is being opened closes what that opening opens, and the
// callers of the opening, the one that ran it and one waiting for it, get
// a database opened afterwards, which works: never the closed one.
func TestWorkspacesCloseWorkspaceDuringOpen(t *testing.T) {
	var openings atomic.Int64
	o := newMockOpener(t, func(dsn string, m sqlmock.Sqlmock) {
		if openings.Add(1) > 1 {
			m.ExpectQuery("SELECT 1").WillReturnRows(sqlmock.NewRows([]string{"?column?"}).AddRow(1))
			m.ExpectQuery("SELECT 1").WillReturnRows(sqlmock.NewRows([]string{"?column?"}).AddRow(1))
		}
		m.ExpectClose()
	})
	o.enter = make(chan string, 2)
	o.release = make(chan struct{})
	ws, err := NewWorkspaces(WorkspacesConfig{Open: o.Open, DSN: mockDSN})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	type result struct {
		db  *sql.DB
		err error
	}
	results := make(chan result, 2)
	go func() {
		db, err := ws.DB(ctx, "w1")
		results <- result{db, err}
	}()
	dsn := <-o.enter
	probe := newReachProbe(ctx)
	go func() {
		db, err := ws.DB(probe, "w1")
		results <- result{db, err}
	}()
	<-probe.reached

	closed := make(chan error, 1)
	go func() { closed <- ws.CloseWorkspace("w1") }()
	require.Eventually(t, func() bool { // CloseWorkspace has taken the entry, and waits for the opening
		ws.mu.Lock()
		defer ws.mu.Unlock()
		return ws.open["w1"] == nil
	}, 5*time.Second, time.Millisecond)
	close(o.release)
	require.NoError(t, <-closed)
	first := o.opened(dsn)[0]
	require.NoError(t, first.ExpectationsWereMet(), "CloseWorkspace closed what the opening opened")

	var dbs []*sql.DB
	for range 2 {
		r := <-results
		require.NoError(t, r.err)
		var one int
		require.NoError(t, r.db.QueryRowContext(ctx, "SELECT 1").Scan(&one), "a caller got the database CloseWorkspace closed")
		dbs = append(dbs, r.db)
	}
	require.Same(t, dbs[0], dbs[1], "both callers get the one database opened afterwards")
	require.Len(t, o.opened(dsn), 2)
	require.NoError(t, ws.Close())
	o.met()
}
