package tenantpg

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// fleetWait bounds the waits for the coordinators to settle.
const fleetWait = 10 * time.Second

var fleetSeq atomic.Int64

// fleetEnv is one fleet test's world: a role whose CONNECTION LIMIT is the
// fleet budget, and the coordination sessions' config.
type fleetEnv struct {
	t    *testing.T
	srv  *pgtest.Server
	role string
	max  int
	cfg  *pgx.ConnConfig
	name string
	k1   int32
	logs *syncBuffer
}

func newFleetEnv(t *testing.T, max int) *fleetEnv {
	t.Helper()
	srv := pgtest.Require(t)
	ignore := []goleak.Option{goleak.IgnoreCurrent()}
	for _, f := range pgtest.HarnessFunctions {
		ignore = append(ignore, goleak.IgnoreAnyFunction(f))
	}
	t.Cleanup(func() {
		srv.DropIdleAdminConns()
		goleak.VerifyNone(t, ignore...)
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	id := fleetSeq.Add(1)
	role, err := srv.CreateRole(ctx, fmt.Sprintf("fleet%d", id), testPassword, max)
	require.NoError(t, err)
	cfg, err := pgx.ParseConfig(srv.URL(role, testPassword, "template1"))
	require.NoError(t, err)
	name := fmt.Sprintf("fleet-test-%d", id)
	return &fleetEnv{t: t, srv: srv, role: role, max: max, cfg: cfg, name: name,
		k1: fleetKey(name, role), logs: &syncBuffer{}}
}

// start starts a coordinator (one simulated process) for a fake host with
// demand.
func (e *fleetEnv) start(demand int, refresh time.Duration) (*fleetCoordinator, *fakeFleetHost) {
	e.t.Helper()
	h := &fakeFleetHost{demand: demand}
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h.mu.Lock()
	c := startFleet(e.cfg, fleetSettings{max: e.max, name: e.name, refresh: refresh}, h, realClock{}, log)
	h.c = c
	h.mu.Unlock()
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(e.t, c.close(ctx))
	})
	return c, h
}

// locks returns the fleet's slot locks per session, as the server sees them.
func (e *fleetEnv) locks() map[uint32]int {
	e.t.Helper()
	rows, err := e.srv.Admin().QueryContext(context.Background(),
		`SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int8::oid
		AND objsubid = 2 AND granted GROUP BY pid`, int64(uint32(e.k1)))
	require.NoError(e.t, err)
	defer rows.Close()
	m := map[uint32]int{}
	for rows.Next() {
		var pid uint32
		var n int
		require.NoError(e.t, rows.Scan(&pid, &n))
		m[pid] = n
	}
	require.NoError(e.t, rows.Err())
	return m
}

// setLimit sets the role's CONNECTION LIMIT.
func (e *fleetEnv) setLimit(n int) {
	e.t.Helper()
	_, err := e.srv.Admin().ExecContext(context.Background(), fmt.Sprintf("ALTER ROLE %s CONNECTION LIMIT %d", pgtest.QuoteIdent(e.role), n))
	require.NoError(e.t, err)
}

// sessions is how many sessions the server has for the role.
func (e *fleetEnv) sessions() int {
	e.t.Helper()
	n, err := e.srv.Backends(context.Background(), e.role)
	require.NoError(e.t, err)
	return n
}

// checkFleet checks the invariants against the server: the slots leased
// stay within F-1 and the sessions within F, and no host was ever told it
// may hold more backends than its session had slots beyond its own (checked
// inside fleetSetHeld, on the coordinator's goroutine). Once settled, each
// host holds no more than its session's slots in pg_locks, less its own;
// while the coordinators move slots that comparison races with them.
func (e *fleetEnv) checkFleet(settled bool, members ...*fleetCoordinator) {
	e.t.Helper()
	locks := e.locks()
	total := 0
	for _, n := range locks {
		total += n
	}
	require.LessOrEqual(e.t, total, e.max-1, "slots leased beyond F-1: %v", locks)
	require.LessOrEqual(e.t, e.sessions(), e.max, "sessions beyond the role's limit")
	for _, c := range members {
		h := c.host.(*fakeFleetHost)
		h.mu.Lock()
		held, lost, bad := h.held, h.lost, h.overSet
		h.mu.Unlock()
		require.Zero(e.t, bad, "fleetSetHeld was called with more than the slots locked")
		if !settled || lost {
			continue
		}
		pid := c.backendPID()
		require.NotZero(e.t, pid)
		require.LessOrEqual(e.t, held, max(0, locks[pid]-1), "host holds more than its session's slots (pid %d, %v)", pid, locks)
	}
}

// eventually polls cond until it holds or fleetWait passes, checking the
// invariants on the way, and returns how long it took.
func (e *fleetEnv) eventually(what string, cond func() bool, members ...*fleetCoordinator) time.Duration {
	e.t.Helper()
	start := time.Now()
	for !cond() {
		e.checkFleet(false, members...)
		if time.Since(start) > fleetWait {
			var b strings.Builder
			for _, c := range members {
				fmt.Fprintf(&b, "\n  pid %d: %+v host %s", c.backendPID(), c.stats(), c.host.(*fakeFleetHost))
			}
			e.t.Fatalf("%s: not within %v; locks %v%s", what, fleetWait, e.locks(), b.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// fakeFleetHost is a budget whose backends open and close at once: open
// follows the demand within what the host may hold, and never goes below
// pinned (busy backends).
type fakeFleetHost struct {
	mu      sync.Mutex
	c       *fleetCoordinator
	demand  int
	yield   int
	open    int
	pinned  int
	hidden  int  // open backends fleetNeed does not count (one opened after it answered)
	keep    bool // fleetYield yields nothing (its backends are busy)
	held    int  // what the coordinator last allowed (or the fallback while lost)
	lost    bool
	lostN   []int
	refused int // fleetSetHeld calls refused
	overSet int // fleetSetHeld calls with more than the slots locked
	yields  int
	asked   int   // what fleetNeed last answered
	floor   int   // what fleetFloor last set
	floors  []int // every fleetFloor call
}

func (h *fakeFleetHost) String() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return fmt.Sprintf("{demand %d yield %d open %d held %d floor %d lost %v %v refused %d yields %d}",
		h.demand, h.yield, h.open, h.held, h.floor, h.lost, h.lostN, h.refused, h.yields)
}

func (h *fakeFleetHost) settleLocked() {
	h.open = max(h.pinned, min(h.demand-h.yield, max(h.held, h.floor)))
}

func (h *fakeFleetHost) fleetNeed() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.asked = max(h.demand-h.yield, h.open-h.hidden)
	return h.asked
}

// lastAsked returns what fleetNeed last answered.
func (h *fakeFleetHost) lastAsked() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.asked
}

func (h *fakeFleetHost) fleetSetHeld(n int) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	// Called on the coordinator's goroutine: its slots can be read here.
	if n > max(0, len(h.c.slots)-1) {
		h.overSet++
	}
	if n < h.open {
		h.refused++
		return false
	}
	h.held, h.lost = n, false
	h.settleLocked()
	return true
}

func (h *fakeFleetHost) fleetYield(n, fair int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.yields++
	if h.keep {
		return
	}
	h.yield = max(h.yield, min(h.yield+n, max(0, h.demand-fair)))
	h.settleLocked()
}

func (h *fakeFleetHost) fleetLost(n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lost = true
	h.lostN = append(h.lostN, n)
	h.held = n
	h.settleLocked()
}

func (h *fakeFleetHost) fleetFloor(n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.floor = n
	h.floors = append(h.floors, n)
	h.settleLocked()
}

// floorCalls returns every floor the coordinator set, in order.
func (h *fakeFleetHost) floorCalls() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.floors...)
}

// setDemand changes the demand (and ends any yield) and pokes, under the
// host's lock as the budget would.
func (h *fakeFleetHost) setDemand(d int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.demand, h.yield = d, 0
	h.settleLocked()
	h.c.poke()
}

func (h *fakeFleetHost) heldNow() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.held
}

// served reports whether the host holds at least n backends granted by the
// coordinator (not a fallback share).
func (h *fakeFleetHost) served(n int) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return !h.lost && h.held >= n
}

func (h *fakeFleetHost) lostCalls() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.lostN...)
}

// TestFleetTwoMembersShareAndMove: two processes with F=10 lease up to
// their need; when one's need drops and the other's rises, the slots move.
func TestFleetTwoMembersShareAndMove(t *testing.T) {
	e := newFleetEnv(t, 10)
	a, ha := e.start(4, 0)
	b, hb := e.start(3, 0)
	e.eventually("both served", func() bool { return ha.heldNow() >= 4 && hb.heldNow() >= 3 }, a, b)
	e.eventually("members counted", func() bool { return a.stats().Members == 2 && b.stats().Members == 2 }, a, b)
	e.checkFleet(true, a, b)
	locks := e.locks()
	require.Len(t, locks, 2)
	require.Equal(t, 5, locks[a.backendPID()], "A: its own slot and 4 backends")
	require.Equal(t, 4, locks[b.backendPID()], "B: its own slot and 3 backends")
	require.Equal(t, 2, e.sessions(), "the role's sessions are the two coordination sessions")
	require.Equal(t, 3, a.stats().FairShare, "(10-1)/2-1")

	ha.setDemand(1)
	hb.setDemand(6)
	took := e.eventually("slots moved to B", func() bool { return hb.heldNow() >= 6 }, a, b)
	t.Logf("slots moved from A to B in %v", took)
	require.Less(t, took, 2*time.Second)
	e.checkFleet(true, a, b)
	require.GreaterOrEqual(t, ha.heldNow(), 1, "A keeps its need")
	st := a.stats()
	require.NotZero(t, st.Released, "A released slots")
	require.True(t, st.Connected)
}

// TestFleetJoinerTakesFromSaturatedMember: A holds every slot; B connects
// through the door, asks, and A yields down to the fair share.
func TestFleetJoinerTakesFromSaturatedMember(t *testing.T) {
	e := newFleetEnv(t, 10)
	a, ha := e.start(8, 0)
	e.eventually("A holds every slot", func() bool { return ha.heldNow() == 8 }, a)
	require.Equal(t, 9, e.locks()[a.backendPID()])
	b, hb := e.start(3, 0)
	took := e.eventually("B served", func() bool { return hb.heldNow() == 3 }, a, b)
	t.Logf("joiner served in %v", took)
	e.checkFleet(true, a, b)
	require.Equal(t, 4, ha.heldNow(), "A yields what B asked for: its need 3 and its session's slot")
	ha.mu.Lock()
	require.NotZero(t, ha.yields)
	ha.mu.Unlock()
}

// TestFleetKilledMemberFreesSlots terminates A's session while A's
// backends are gone too (as when its process dies): its slots serve B at
// once, A falls back to its fair share, reconnects, and is served again
// when its demand comes back.
func TestFleetKilledMemberFreesSlots(t *testing.T) {
	e := newFleetEnv(t, 10)
	a, ha := e.start(6, 0)
	e.eventually("A served", func() bool { return ha.served(6) }, a)
	b, hb := e.start(6, 0)
	// B gets the free slots and asks for more: A yields to the fair share.
	e.eventually("shared", func() bool { return hb.served(4) && ha.heldNow() == 3 }, a, b)
	e.checkFleet(true, a, b)
	pidA := a.backendPID()
	require.Equal(t, 4, e.locks()[pidA])

	// A's backends close without telling the coordinator (no poke), and
	// its session is terminated.
	ha.mu.Lock()
	ha.demand, ha.yield, ha.open = 0, 0, 0
	ha.mu.Unlock()
	start := time.Now()
	var killed bool
	require.NoError(t, e.srv.Admin().QueryRowContext(context.Background(), "SELECT pg_terminate_backend($1)", int(pidA)).Scan(&killed))
	require.True(t, killed)
	took := e.eventually("B takes A's slots", func() bool { return hb.served(6) }, a, b)
	t.Logf("a killed member's slots served the other in %v", took)
	require.Less(t, time.Since(start), 2*time.Second, "target: freed slots serve others within 2s")

	e.eventually("A lost and reconnected", func() bool {
		pid := a.backendPID()
		return pid != 0 && pid != pidA && ha.served(0)
	}, a, b)
	require.Equal(t, []int{3}, ha.lostCalls(), "A falls back to the last fair share")
	st := a.stats()
	require.Equal(t, uint64(1), st.Failures)
	require.Contains(t, st.LastError, "57P01")
	e.checkFleet(true, a, b)

	// A's demand comes back: B yields down to the fair share.
	ha.setDemand(6)
	took = e.eventually("A served again", func() bool { return ha.served(3) }, a, b)
	t.Logf("the reconnected member was served again in %v", took)
	e.checkFleet(true, a, b)
	require.Equal(t, 2, e.sessions())
}

// TestFleetBatchOneRoundTrip: with F=64 a lease takes 4 slots (F/16) at
// least, in one round trip, and a need of 20 is leased in one round trip
// too.
func TestFleetBatchOneRoundTrip(t *testing.T) {
	e := newFleetEnv(t, 64)
	a, ha := e.start(1, time.Hour)
	e.eventually("served", func() bool { return ha.heldNow() >= 1 }, a)
	st := a.stats()
	// LISTEN, the member count, one lease.
	require.Equal(t, uint64(3), st.RoundTrips, "%+v", st)
	require.Equal(t, uint64(4), st.Leased, "own slot and need 1, batch of 4")
	require.Equal(t, 3, ha.heldNow(), "the batch's spare slots are the host's too")

	ha.setDemand(3) // covered by the batch: no round trip
	e.eventually("need 3 seen", func() bool { return ha.lastAsked() == 3 }, a)
	require.Equal(t, uint64(3), a.stats().RoundTrips, "need 3 is covered by the batch")
	ha.setDemand(20)
	e.eventually("need 20 served", func() bool { return ha.heldNow() >= 20 }, a)
	st = a.stats()
	require.Equal(t, uint64(4), st.RoundTrips, "need 20 in one round trip: %+v", st)
	require.Equal(t, 21, e.locks()[a.backendPID()])
}

// TestFleetNoPasswordInErrors: failures (the role's limit refusing the
// session, a killed session) are reported in stats and logs without the
// password or DSN; a refused session is retried until it gets in.
func TestFleetNoPasswordInErrors(t *testing.T) {
	e := newFleetEnv(t, 10)
	e.setLimit(0) // a refusal that is no login failure: the coordinator backs off and retries the same DSN
	c, h := e.start(1, 0)
	e.eventually("refusals recorded", func() bool { return c.stats().Failures >= 2 })
	st := c.stats()
	require.False(t, st.Connected)
	require.Contains(t, st.LastError, "53300", "the server's answer is kept: %s", st.LastError)
	require.Equal(t, []int{1}, h.lostCalls(), "never connected: the host falls back to 1, once")
	e.setLimit(10)
	e.eventually("got in", func() bool { return h.served(1) }, c)

	var killed bool
	require.NoError(t, e.srv.Admin().QueryRowContext(context.Background(), "SELECT pg_terminate_backend($1)", int(c.backendPID())).Scan(&killed))
	e.eventually("loss recorded", func() bool { return len(h.lostCalls()) == 2 }, c)
	killedErr := c.stats().LastError
	require.Contains(t, killedErr, "57P01", "terminated by an administrator")

	for _, text := range []string{st.LastError, killedErr, fmt.Sprintf("%+v", c.stats()), e.logs.String()} {
		require.NotContains(t, text, testPassword)
		require.NotContains(t, text, "postgres://")
		require.NotContains(t, text, "password=")
		// pgx's description of a refused dial names the role and the
		// database; the recorded error is the server's answer alone.
		require.NotContains(t, text, "failed to connect to")
		require.NotContains(t, text, "user=")
	}
	require.Contains(t, e.logs.String(), "fleet coordination failed", "the failures were logged")
}

// TestFleetCloseUnlocksEverything: close unlocks the slots while the
// session is up, and the role's sessions go back to none.
func TestFleetCloseUnlocksEverything(t *testing.T) {
	e := newFleetEnv(t, 10)
	a, ha := e.start(5, 0)
	e.eventually("served", func() bool { return ha.heldNow() == 5 }, a)
	require.Equal(t, 6, e.locks()[a.backendPID()])
	require.NoError(t, a.close(context.Background()))
	require.NoError(t, a.close(context.Background()))
	require.Empty(t, e.locks())
	e.eventually("session gone", func() bool { return e.sessions() == 0 })
	st := a.stats()
	require.Equal(t, st.Leased, st.Released, "%+v", st)
	require.False(t, st.Connected)
}

// TestFleetBothShortStayQuiet: two members that both want more than the
// fleet has, and cannot yield (their backends are busy), hear each other's
// needs; they must not wake each other into a loop: their round trips stay
// within the retry pace (a lease and a notification a retry, at
// fleetRetryMax after a while).
func TestFleetBothShortStayQuiet(t *testing.T) {
	e := newFleetEnv(t, 10)
	a, ha := e.start(4, 0)
	b, hb := e.start(3, 0)
	e.eventually("both served", func() bool { return ha.served(4) && hb.served(3) }, a, b)
	for _, h := range []*fakeFleetHost{ha, hb} {
		h.mu.Lock()
		h.keep = true
		h.mu.Unlock()
		h.setDemand(8)
	}
	e.eventually("both heard the other", func() bool {
		ha.mu.Lock()
		defer ha.mu.Unlock()
		hb.mu.Lock()
		defer hb.mu.Unlock()
		return ha.yields > 0 && hb.yields > 0
	}, a, b)
	ra, rb := a.stats().RoundTrips, b.stats().RoundTrips
	start := time.Now()
	// Not a synchronisation: the interval over which the pace is measured.
	time.Sleep(2 * time.Second)
	da, db := a.stats().RoundTrips-ra, b.stats().RoundTrips-rb
	per := float64(da+db) / time.Since(start).Seconds()
	t.Logf("round trips over %v: A %d, B %d (%.1f/s); A %s, B %s", time.Since(start).Round(time.Millisecond), da, db, per, ha, hb)
	require.Less(t, per, 30.0, "two short members must not wake each other in a loop")
	e.checkFleet(true, a, b)
	require.Equal(t, 4, ha.heldNow())
	require.Equal(t, 3, hb.heldNow())
}

// squatRole creates a role of the neighbour's, with no CONNECTION LIMIT:
// it can connect to the coordination database as any role can by default.
func squatRole(t *testing.T, srv *pgtest.Server) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	role, err := srv.CreateRole(ctx, fmt.Sprintf("squat%d", fleetSeq.Add(1)), testPassword, -1)
	require.NoError(t, err)
	return role
}

// squatConn opens a session as role to the coordination database.
func squatConn(t *testing.T, srv *pgtest.Server, role string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), srv.URL(role, testPassword, fleetDefaultDatabase))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// TestFleetSquatterIgnoredAndReported: a session of another role holds
// every slot before the member starts. The member does not count it,
// serves at a floor of one backend, reports it once (stats and one Warn
// line, whatever the number of counts), and ignores a "need" that another
// role's session sends, while it still hears one from a session of its
// own role. When the squatter lets go, the member leases and the floor
// goes.
func TestFleetSquatterIgnoredAndReported(t *testing.T) {
	e := newFleetEnv(t, 6)
	ctx := context.Background()
	role := squatRole(t, e.srv)
	squat := squatConn(t, e.srv, role)
	_, err := squat.Exec(ctx, "SELECT pg_advisory_lock($1::int4, s) FROM generate_series(1, $2::int4) AS s", e.k1, e.max-1)
	require.NoError(t, err)
	squatPID := squat.PgConn().PID()

	// A short refresh: many counts, for the once-per-squatter check.
	a, ha := e.start(2, 50*time.Millisecond)
	e.eventually("served at the floor", func() bool {
		ha.mu.Lock()
		defer ha.mu.Unlock()
		return ha.floor == 1 && ha.open == 1
	}, a)
	want := []FleetSquatter{{Role: role, PID: squatPID, Slots: e.max - 1}}
	e.eventually("reported", func() bool { return slices.Equal(a.stats().Squatters, want) }, a)
	require.Equal(t, 1, a.stats().Members, "the squatter is no member")
	require.Zero(t, ha.heldNow(), "no slot leased: the floor is not a lease")
	require.Equal(t, []int{1}, ha.floorCalls())
	trips := a.stats().RoundTrips
	e.eventually("counted again and again", func() bool { return a.stats().RoundTrips >= trips+10 }, a)
	logs := e.logs.String()
	require.Equal(t, 1, strings.Count(logs, "another role holds slots"), "one Warn line per squatter:\n%s", logs)
	require.Contains(t, logs, "level=WARN")
	require.Contains(t, logs, "role="+role)
	require.Contains(t, logs, fmt.Sprintf("pid=%d", squatPID))

	// Another role's need, then one from a session of the fleet's role: the
	// host yields once, to the second; the sender of the first is no member.
	spoof := squatConn(t, e.srv, role)
	_, err = spoof.Exec(ctx, "SELECT pg_notify($1, $2)", fleetChannel(e.k1), "need 1 4")
	require.NoError(t, err)
	member := e.conn()
	_, err = member.Exec(ctx, "SELECT pg_notify($1, $2)", fleetChannel(e.k1), fmt.Sprintf("need %d 1", member.PgConn().PID()))
	require.NoError(t, err)
	e.eventually("the member's need heard", func() bool {
		ha.mu.Lock()
		defer ha.mu.Unlock()
		return ha.yields > 0
	}, a)
	ha.mu.Lock()
	yields := ha.yields
	ha.mu.Unlock()
	require.Equal(t, 1, yields, "the other role's need was heard too")
	require.Equal(t, 2, a.stats().Members, "this one and the member heard, neither squatter nor spoofer")

	// The squatter lets go: the slots are leased and the floor goes.
	_, err = squat.Exec(ctx, "SELECT pg_advisory_unlock_all()")
	require.NoError(t, err)
	ha.setDemand(2) // the yield to the member is over
	e.eventually("leased", func() bool { return ha.served(2) && len(a.stats().Squatters) == 0 }, a)
	e.eventually("floor lifted", func() bool { return slices.Equal(ha.floorCalls(), []int{1, 0}) }, a)
	e.checkFleet(true, a)
}
