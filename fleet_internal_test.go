package tenantpg

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// conn opens a plain session as the env's role to the coordination
// database.
func (e *fleetEnv) conn() *pgx.Conn {
	e.t.Helper()
	cfg := e.cfg.Copy()
	cfg.Database = fleetDefaultDatabase
	conn, err := pgx.ConnectConfig(context.Background(), cfg)
	require.NoError(e.t, err)
	e.t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// TestFleetLeaseQueryStopsAtLimit checks the lease statement on the
// server: the plan has no node between the LIMIT and the function scan
// whose filter takes the locks, the try-lock runs only for the rows the
// LIMIT pulls (the locks held equal the rows returned), and a slot the
// session holds already is skipped, not locked a second time.
func TestFleetLeaseQueryStopsAtLimit(t *testing.T) {
	e := newFleetEnv(t, 64)
	ctx := context.Background()
	conn := e.conn()
	other := e.conn()
	k1 := e.k1

	var plan []string
	rows, err := conn.Query(ctx, "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "+leaseSQL, 0, 63, []int32{}, k1, 5)
	require.NoError(t, err)
	for rows.Next() {
		var line string
		require.NoError(t, rows.Scan(&line))
		plan = append(plan, line)
	}
	require.NoError(t, rows.Err())
	t.Logf("lease plan:\n%s", strings.Join(plan, "\n"))
	require.True(t, strings.HasPrefix(plan[0], "Limit (actual rows=5"), "%v", plan)
	require.Contains(t, plan[1], "Function Scan on generate_series i (actual rows=5", "the scan under the LIMIT yields only 5 rows")
	require.Contains(t, strings.Join(plan, "\n"), "pg_try_advisory_lock")
	require.NotContains(t, strings.Join(plan, "\n"), "Sort")
	require.Equal(t, map[uint32]int{conn.PgConn().PID(): 5}, e.locks(), "EXPLAIN ANALYZE ran it: 5 locks, no more")
	_, err = conn.Exec(ctx, "SELECT pg_advisory_unlock_all()")
	require.NoError(t, err)

	// Slots 1..3 taken by another session, 4 and 5 held by this one: from
	// offset 0 the next three are 6, 7, 8.
	for s := int32(1); s <= 3; s++ {
		_, err := other.Exec(ctx, "SELECT pg_advisory_lock($1::int4, $2::int4)", k1, s)
		require.NoError(t, err)
	}
	for s := int32(4); s <= 5; s++ {
		_, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1::int4, $2::int4)", k1, s)
		require.NoError(t, err)
	}
	rows, err = conn.Query(ctx, leaseSQL, 0, 63, []int32{4, 5}, k1, 3)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	require.NoError(t, err)
	require.Equal(t, []int32{6, 7, 8}, got)
	// One unlock each releases 4 and 5: they were not locked twice.
	var unlocked int32
	require.NoError(t, conn.QueryRow(ctx, releaseSQL, k1, []int32{4, 5, 6, 7, 8}).Scan(&unlocked))
	require.Equal(t, int32(5), unlocked)
	require.Equal(t, map[uint32]int{other.PgConn().PID(): 3}, e.locks())

	// The member count sees the other session, by the unsigned classid, as
	// one of the role's.
	var pid, n int32
	var own bool
	var role string
	require.NoError(t, conn.QueryRow(ctx, membersSQL, int64(uint32(k1))).Scan(&pid, &own, &role, &n))
	require.Equal(t, int32(other.PgConn().PID()), pid)
	require.True(t, own)
	require.Equal(t, e.role, role)
	require.Equal(t, int32(3), n)
}

// TestFleetWaitCancelKeepsSession is the experiment behind the one-session
// design: a WaitForNotification cut short by its context (as poke and the
// timer do) leaves the session usable, with its LISTEN and its locks, in
// pgx v5.12 with the default context watcher.
func TestFleetWaitCancelKeepsSession(t *testing.T) {
	e := newFleetEnv(t, 10)
	ctx := context.Background()
	conn := e.conn()
	other := e.conn()
	_, err := conn.Exec(ctx, "LISTEN fleet_wait_test")
	require.NoError(t, err)
	_, err = conn.Exec(ctx, "SELECT pg_advisory_lock($1::int4, 1)", e.k1)
	require.NoError(t, err)
	for i := 0; i < 20; i++ {
		wctx, cancel := context.WithCancel(ctx)
		time.AfterFunc(time.Duration(i%4)*time.Millisecond, cancel)
		_, err := conn.WaitForNotification(wctx)
		cancel()
		require.True(t, errors.Is(err, context.Canceled), "%v", err)
		require.False(t, conn.IsClosed())
		var one int
		require.NoError(t, conn.QueryRow(ctx, "SELECT 1").Scan(&one))
	}
	_, err = other.Exec(ctx, "NOTIFY fleet_wait_test, 'hello'")
	require.NoError(t, err)
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	n, err := conn.WaitForNotification(wctx)
	cancel()
	require.NoError(t, err)
	require.Equal(t, "hello", n.Payload)
	require.Equal(t, other.PgConn().PID(), n.PID)
	require.Equal(t, map[uint32]int{conn.PgConn().PID(): 1}, e.locks(), "the lock lives on")
}

// TestFleetLoweringRefused: when the host's open backends do not fit
// (fleetSetHeld returns false: they were opened after fleetNeed answered),
// the coordinator keeps the slots, and releases them once the host lets go
// and pokes.
func TestFleetLoweringRefused(t *testing.T) {
	e := newFleetEnv(t, 10)
	a, ha := e.start(6, 0)
	e.eventually("served", func() bool { return ha.served(6) }, a)
	ha.mu.Lock()
	ha.pinned, ha.hidden = 6, 6 // busy backends, not in the need
	ha.mu.Unlock()
	b, hb := e.start(5, 0)
	e.eventually("A refused to lower", func() bool {
		ha.mu.Lock()
		defer ha.mu.Unlock()
		return ha.refused > 0
	}, a, b)
	e.checkFleet(true, a, b)
	require.Equal(t, 7, e.locks()[a.backendPID()], "A keeps the slots its busy backends use")
	require.Equal(t, 6, ha.heldNow())

	ha.mu.Lock()
	ha.pinned, ha.hidden = 0, 0
	ha.settleLocked()
	ha.c.poke()
	ha.mu.Unlock()
	e.eventually("B served after A let go", func() bool { return hb.served(4) }, a, b)
	e.checkFleet(true, a, b)
}

// TestFleetServerRestart: a restart ends every session; both members fall
// back, reconnect and lease again.
func TestFleetServerRestart(t *testing.T) {
	e := newFleetEnv(t, 10)
	a, ha := e.start(3, 0)
	b, hb := e.start(3, 0)
	e.eventually("served", func() bool { return ha.served(3) && hb.served(3) }, a, b)
	require.NoError(t, e.srv.Restart())
	e.eventually("both lost", func() bool { return len(ha.lostCalls()) == 1 && len(hb.lostCalls()) == 1 })
	took := e.eventually("both back", func() bool { return ha.served(3) && hb.served(3) }, a, b)
	t.Logf("back %v after the restart returned", took)
	e.checkFleet(true, a, b)
	require.True(t, a.stats().Connected)
}

// TestFleetArithmetic pins the formulas: the fair share keeps one slot of
// each member's share for its session, the batch is F/16, and the key and
// channel are stable (every process must derive the same ones).
func TestFleetArithmetic(t *testing.T) {
	require.Equal(t, 8, fleetFair(10, 1))
	require.Equal(t, 3, fleetFair(10, 2), "(10-1)/2-1")
	require.Equal(t, 1, fleetFair(10, 9), "at least 1")
	require.Equal(t, 1, fleetBatch(10))
	require.Equal(t, 4, fleetBatch(64))
	require.Equal(t, fleetKey("tenantpg", "app"), fleetKey("tenantpg", "app"))
	require.NotEqual(t, fleetKey("tenantpg", "app"), fleetKey("tenantpg", "app2"))
	require.NotEqual(t, fleetKey("a", "bc"), fleetKey("ab", "c"), "the parts are separated")
	require.Regexp(t, `^tenantpg_fleet_[0-9a-f]{8}$`, fleetChannel(fleetKey("tenantpg", "app")))
}

// TestFleetErrorText: what the coordinator records and logs of a failure
// is the server's answer, the network's, or its own error, never pgx's
// description of the dial nor anything else an error may carry.
func TestFleetErrorText(t *testing.T) {
	refused := &pgconn.PgError{Severity: "FATAL", Code: "53300", Message: `too many connections for role "app"`}
	for _, c := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("failed to connect to `user=app database=postgres`: %w", refused), `FATAL: too many connections for role "app" (SQLSTATE 53300)`},
		{fmt.Errorf("lease: %w", context.DeadlineExceeded), "timeout"},
		{fmt.Errorf("%w: 2 of 3", errSlotsNotHeld), "tenantpg: fleet: slots released were not held: 2 of 3"},
		{&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, syscall.ECONNREFUSED.Error()},
		{errors.New("cannot parse `postgres://app:secret@db/postgres`"), "connection failed"},
	} {
		require.Equal(t, c.want, fleetErrorText(c.err), "%v", c.err)
	}
}
