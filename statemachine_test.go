package tenantpg

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// The state-machine test drives the budget directly, without a server, with
// random sequences of the events the handles, the network and the timers
// produce, and checks it after every event against a model: which tokens are
// held and why, which backends exist and in which state, who waits in which
// order, which database each eviction must pick (SLRU), which timers must be
// armed, what every caller gets back, and the counters.
//
// Everything that runs is the test's: the clock is manual and the test fires
// the timers the budget armed (only those, and only when armed), sockets are
// drained when the test says so, and the goroutine of each waiter (blocked in
// await) is waited for through a channel. So every event runs to completion
// before the next, and an input replays the same way every time.

// smEpoch is the model's time zero.
var smEpoch = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

// smHang bounds the real time the test waits for a goroutine the model says
// must finish (a served waiter, Driver.Close): only a hang reaches it.
const smHang = 10 * time.Second

// smClock is the manual clock: Now is the model's time, and AfterFunc
// records a timer that fires only when the test fires it.
type smClock struct {
	mu     sync.Mutex
	now    time.Time
	seq    int
	timers []*smTimer
}

type smTimer struct {
	c      *smClock
	f      func()
	at     time.Time
	seq    int // arming order: ties between timers due at once
	active bool
}

func (c *smClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *smClock) AfterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	t := &smTimer{c: c, f: f, at: c.now.Add(d), seq: c.seq, active: true}
	c.timers = append(c.timers, t)
	return t
}

func (t *smTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	t.active = false
	return was
}

func (t *smTimer) Reset(d time.Duration) bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	t.c.seq++
	t.seq, t.at, t.active = t.c.seq, t.c.now.Add(d), true
	return was
}

func (t *smTimer) state() (at time.Time, active bool) {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	return t.at, t.active
}

// earliest returns the armed timer due first, or nil.
func (c *smClock) earliest() *smTimer {
	c.mu.Lock()
	defer c.mu.Unlock()
	var e *smTimer
	for _, t := range c.timers {
		if t.active && (e == nil || t.at.Before(e.at) || t.at.Equal(e.at) && t.seq < e.seq) {
			e = t
		}
	}
	return e
}

// expire disarms t as if its time had come, moving the clock to it (never
// backwards: a timer armed in the past fires now).
func (c *smClock) expire(t *smTimer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t.active = false
	if t.at.After(c.now) {
		c.now = t.at
	}
}

func (c *smClock) set(to time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if to.After(c.now) {
		c.now = to
	}
}

// forget drops a timer that can never fire again.
func (c *smClock) forget(t *smTimer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.timers {
		if x == t {
			c.timers = append(c.timers[:i], c.timers[i+1:]...)
			return
		}
	}
}

func (c *smClock) all() []*smTimer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*smTimer(nil), c.timers...)
}

// smCtx is a context the test ends itself, with the error it chooses: an
// acquire timeout (DeadlineExceeded) or a cancellation.
type smCtx struct {
	done chan struct{}
	mu   sync.Mutex
	err  error
}

func newSMCtx() *smCtx                       { return &smCtx{done: make(chan struct{})} }
func (c *smCtx) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c *smCtx) Done() <-chan struct{}       { return c.done }
func (c *smCtx) Value(any) any               { return nil }

func (c *smCtx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// end ends the context with err, unless it has ended already.
func (c *smCtx) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
		close(c.done)
	}
}

// smIO stands in for pgx: closing a backend closes its socket (starting its
// drain, which the test ends later) unless the socket was closed already,
// and a backend is broken when the model broke it.
type smIO struct {
	b        *budget
	mu       sync.Mutex
	broke    map[*backend]bool
	sockOpen map[*backend]bool
	closed   []*backend // in close order, since the model last looked
}

func (io *smIO) close(be *backend) {
	io.mu.Lock()
	io.closed = append(io.closed, be)
	start := io.sockOpen[be]
	io.sockOpen[be] = false
	io.mu.Unlock()
	if start {
		io.b.drainStarted()
	}
}

func (io *smIO) broken(be *backend) bool {
	io.mu.Lock()
	defer io.mu.Unlock()
	return io.broke[be]
}

func (io *smIO) set(m map[*backend]bool, be *backend, v bool) {
	io.mu.Lock()
	defer io.mu.Unlock()
	m[be] = v
}

func (io *smIO) takeClosed() []*backend {
	io.mu.Lock()
	defer io.mu.Unlock()
	c := io.closed
	io.closed = nil
	return c
}

// The model.

type smDB struct {
	i        int
	ws       string
	d        *database // its pool; nil while the budget has forgotten it
	regs     int       // its connector, while open (0 or 1)
	closed   bool      // its connector was closed: check-ins close backends
	handles  int       // checkouts under way: waiting, dialing or holding a backend
	awaiting int       // waiters whose await has not returned: each holds a ref
	reserved int
	maxConns int
	useTime  float64 // the model's EWMA of use times
	// debt bounds the budget's decaying wait debt from above: the waits
	// owed since it was last paid by a dial, undecayed.
	debt    float64
	owed    float64 // waits owed in the current sub-step
	prot    bool    // in the protected segment
	touch   int     // sub-step of the last touch: its recency
	demoted int     // sub-step of its last demotion to probation
	// protAmbiguous: a token of it was released and another granted in
	// one sub-step, so whether its open count touched zero in between
	// (which unprotects it) depends on an order the model does not see.
	protAmbiguous bool
}

func (D *smDB) refs() int { return D.regs + D.handles + D.awaiting }

func (D *smDB) owe(waited time.Duration) {
	D.debt += float64(waited)
	D.owed += float64(waited)
}

type smToken struct {
	epoch    uint64 // the pacer's epoch at its grant
	db       *smDB
	tok      *token
	be       *smBackend
	dialing  bool
	closing  bool
	ended    bool
	sockets  []*smSocket // dialed for it and not drained
	gone     <-chan struct{}
	released bool
}

type smSocket struct {
	tok      *smToken
	be       *smBackend // nil unless it is a backend's own socket
	draining bool
}

type smBState uint8

const (
	smBusy smBState = iota
	smIdle
	smClosing // closed by the driver
)

type smBackend struct {
	id         int
	db         *smDB
	be         *backend
	tok        *smToken
	sock       *smSocket
	state      smBState
	broken     bool
	created    time.Time
	checkedOut time.Time
	idleSince  time.Time
	idleSeq    int // sub-step of its check-in: longest idle first
}

type smWaiter struct {
	id       int
	db       *smDB
	w        *waiter
	since    time.Time
	ctx      *smCtx // the acquire context: ends on timeout or cancellation
	caller   *smCtx // the application's context: ends on cancellation
	patience *smTimer
	// Observed before each sub-step.
	preSeeking, preClaim bool
	granted              bool     // served with a token in the current sub-step
	tok                  *smToken // the token it was served with
	patienceFor          time.Duration
}

type smResult struct {
	id  int
	be  *backend
	tok *token
	err error
}

type smReaper struct{}

// smCov counts what the seeds exercise, so that a generator that stops
// reaching something fails TestBudgetStateMachineCoverage instead of passing
// vacuously.
type smCov struct {
	evictions, lruCompared, waits, handoffs, growth, patience, reconfigures, demotions, drains     int
	starving, reaps, rejections, reuses, discards, shrinks, unused, closes, timeouts, dialFailures int
	// spareTaken: a growing database's caller evicted a spare backend;
	// growthHeld: one waited while only a last backend was idle.
	spareTaken, growthHeld int
}

// smExpect is what the sub-step under way must do.
type smExpect struct {
	busy       *smBackend  // the backend a check-in, discard or dial is about
	busyReason evictReason // why it must be closed; reasonNone: it must not be
	handoffTo  *smWaiter   // the waiter that must get busy at check-in
	handedOff  bool
	idle       map[*smBackend]evictReason // idle backends that must be closed, and why
	patience   *smWaiter                  // the waiter whose patience timer ran
	grow       []*smDB                    // databases growLocked ran for last
}

type stateMachine struct {
	t            testing.TB
	b            *budget
	clk          *smClock
	io           *smIO
	cfg          Config
	handoffAfter time.Duration

	dbs       []*smDB
	tokens    []*smToken // not released
	backends  map[*backend]*smBackend
	alive     []*smBackend // busy or idle, in creation order
	draining  []*smSocket  // drain started, not ended
	waiters   []*smWaiter  // in await, in arrival order
	byW       map[*waiter]*smWaiter
	results   chan smResult
	pending   []*smTimer // fired; callback not run yet
	roles     map[*smTimer]any
	closed    bool
	closeDone chan struct{}
	// closeReturned: Close returned, once every socket had drained.
	closeReturned bool
	waitAmbiguous bool
	armed         *smWaiter // the waiter whose patience the sub-step armed
	lowered       bool      // the budget was lowered once: open may exceed it until busy backends return
	followups     []func()
	ids           int
	seq           int // sub-step counter: the recency clock
	locked        bool
	// Dial pacing: the model's AIMD, and the dials and claims under way
	// before the sub-step.
	paceSlots   int
	paceDials   []smPaceDial // successful dials, for the baseline
	paceGood    int
	paceEpoch   uint64
	preInFlight int

	// Expected counters.
	evictions                                       [numReasons]uint64
	handoffs, dials, exhausted, timeouts, waitCount uint64
	dialErrors                                      [numDialErrorKinds]uint64
	dialTime                                        float64
	exp                                             smExpect
	preOpen, preShared, preReserved                 int
	preLive                                         map[*smDB]int
	preQueue                                        []*smWaiter
	grantedNow                                      []*smWaiter
	released                                        map[*smDB]bool
	log                                             []smLine
	cov                                             *smCov
}

// smLine is a line of the log, formatted only if a run fails.
type smLine struct {
	seq    int
	at     time.Duration
	format string
	args   []any
}

func (m *stateMachine) logf(format string, args ...any) {
	m.log = append(m.log, smLine{m.seq, m.clk.Now().Sub(smEpoch), format, args})
}

func (m *stateMachine) fail(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("%s\nafter:\n  %s\nbudget:\n%s", fmt.Sprintf(format, args...), m.logTail(80), m.dump())
}

func (m *stateMachine) logTail(n int) string {
	lines := m.log
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	var sb strings.Builder
	for i, l := range lines {
		if i > 0 {
			sb.WriteString("\n  ")
		}
		fmt.Fprintf(&sb, "%4d %6s ", l.seq, l.at)
		fmt.Fprintf(&sb, l.format, l.args...)
	}
	return sb.String()
}

// dump describes the budget and the model; fail may be called with b.mu
// held (m.locked) or not.
func (m *stateMachine) dump() string {
	b := m.b
	if !m.locked {
		b.mu.Lock()
		defer b.mu.Unlock()
	}
	var sb strings.Builder
	sv := m.srv()
	fmt.Fprintf(&sb, "  limit %d reserved %d shared %d/%d open %d dialing %d inUse %d idle %d closing %d waiting %d seeking %d closed %v reaper %v@%s dialTime %s\n",
		sv.limit, sv.reserved, sv.sharedInUse, sv.sharedLive, sv.open, sv.dialing, sv.inUse, sv.idle, sv.closing, b.waiting, sv.queue.len, b.closed,
		b.reaper.armed, b.reaper.at.Sub(smEpoch), b.dialTime.duration())
	for w := sv.queue.front; w != nil; w = sv.queue.next(w) {
		id := -1
		if sw := m.byW[w]; sw != nil {
			id = sw.id
		}
		fmt.Fprintf(&sb, "  seeker w%d %s since %s claim %v\n", id, w.db.workspace, w.since.Sub(smEpoch), w.claim != nil)
	}
	for _, D := range m.dbs {
		fmt.Fprintf(&sb, "  model %s: regs %d handles %d awaiting %d reserved %d maxConns %d cap %d prot %v touch %d demoted %d useTime %s\n",
			D.ws, D.regs, D.handles, D.awaiting, D.reserved, D.maxConns, m.capOf(D), D.prot, D.touch, D.demoted, time.Duration(D.useTime))
		d := D.d
		if d == nil {
			continue
		}
		fmt.Fprintf(&sb, "    budget: open %d dialing %d inUse %d idle %d closing %d waiters %d seeking %d refs %d listed %v protected %v useTime %s\n",
			d.open, d.dialing, d.inUse, d.idle, d.closing, d.waiters.len, d.seeking, d.refs, d.lru.listed, d.protected, d.useTime.duration())
	}
	for _, mb := range m.alive {
		fmt.Fprintf(&sb, "  backend %d %s busy %v broken %v created %s", mb.id, mb.db.ws, mb.state == smBusy, mb.broken, mb.created.Sub(smEpoch))
		if mb.state == smIdle {
			fmt.Fprintf(&sb, " idle since %s (sub-step %d)", mb.idleSince.Sub(smEpoch), mb.idleSeq)
		}
		sb.WriteString("\n")
	}
	for _, sw := range m.waiters {
		fmt.Fprintf(&sb, "  waiter w%d %s since %s\n", sw.id, sw.db.ws, sw.since.Sub(smEpoch))
	}
	return sb.String()
}

// Model arithmetic, written independently of the budget's.

func smEWMA(e float64, d time.Duration, alpha float64) float64 {
	if e == 0 {
		return float64(d)
	}
	return e + alpha*(float64(d)-e)
}

func (m *stateMachine) limit() int { return m.cfg.MaxConnections }

func (m *stateMachine) capOf(D *smDB) int {
	c := m.cfg.MaxConnectionsPerDB
	if D.maxConns > 0 {
		c = D.maxConns
	}
	c = min(c, m.limit())
	return max(c, D.reserved)
}

type smCounts struct{ open, closing, dialing, busy, idle int }

func (m *stateMachine) counts(D *smDB) (c smCounts) {
	for _, tk := range m.tokens {
		if tk.db == D && !tk.released {
			c.open++
			if tk.closing {
				c.closing++
			}
			if tk.dialing {
				c.dialing++
			}
		}
	}
	for _, mb := range m.alive {
		if mb.db == D {
			if mb.state == smBusy {
				c.busy++
			} else {
				c.idle++
			}
		}
	}
	return c
}

func (m *stateMachine) live(D *smDB) int { c := m.counts(D); return c.open - c.closing }

func (m *stateMachine) openTotal() (n int) {
	for _, tk := range m.tokens {
		if !tk.released {
			n++
		}
	}
	return n
}

// alive: the budget holds a state for D, or is about to (a register).
func (D *smDB) alive() bool { return D.d != nil || D.regs > 0 }

func (m *stateMachine) reservedSum() (n int) {
	for _, D := range m.dbs {
		if D.alive() {
			n += D.reserved
		}
	}
	return n
}

func (m *stateMachine) shared() (inUse, live int) {
	for _, D := range m.dbs {
		c := m.counts(D)
		inUse += max(0, c.open-D.reserved)
		live += max(0, c.open-c.closing-D.reserved)
	}
	return inUse, live
}

func (m *stateMachine) room(D *smDB) bool {
	inUse, _ := m.shared()
	return m.openTotal() < m.limit() && (m.counts(D).open < D.reserved || inUse < m.limit()-m.reservedSum())
}

func (m *stateMachine) overLimit(D *smDB) bool {
	live := m.live(D)
	_, sharedLive := m.shared()
	return live > m.capOf(D) || live > D.reserved && sharedLive > m.limit()-m.reservedSum()
}

// shouldDial is the wait-or-dial rule: with n backends (live and to be
// dialed) serving q queued callers, the queue costs q(q+1)/2·useTime/n; a
// dial costs cost.
//
// The budget also dials when its callers' waits, decaying over a second,
// add up to more than a dial: debt, when not negative, bounds that sum.
func (m *stateMachine) shouldDial(D *smDB, n, q int, cost time.Duration, debt float64) bool {
	if n <= 0 {
		return true
	}
	if n >= m.capOf(D) || D.useTime == 0 {
		return false
	}
	qf := float64(q)
	return qf*(qf+1)/2*D.useTime/float64(n) > float64(cost) || debt > float64(cost)
}

func (m *stateMachine) idleOf(D *smDB) []*smBackend { // longest idle first
	var out []*smBackend
	for _, mb := range m.alive {
		if mb.db == D && mb.state == smIdle {
			out = append(out, mb)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].idleSeq < out[j].idleSeq })
	return out
}

func (m *stateMachine) busyBackends() (out []*smBackend) {
	for _, mb := range m.alive {
		if mb.state == smBusy {
			out = append(out, mb)
		}
	}
	return out
}

func (m *stateMachine) dialingTokens() (out []*smToken) {
	for _, tk := range m.tokens {
		if tk.dialing {
			out = append(out, tk)
		}
	}
	return out
}

func (m *stateMachine) waitersOf(D *smDB) (out []*smWaiter) {
	for _, sw := range m.waiters {
		if sw.db == D {
			out = append(out, sw)
		}
	}
	return out
}

// rank places D in the eviction order: probation before protected, least
// recently used first, a demotion counting as a use.
func (m *stateMachine) rank(D *smDB) (segment, used int) {
	if D.prot {
		return 1, D.touch
	}
	return 0, max(D.touch, D.demoted)
}

func (m *stateMachine) evictsBefore(a, b *smDB) bool {
	sa, ua := m.rank(a)
	sb, ub := m.rank(b)
	return sa < sb || sa == sb && ua < ub
}

// evictionOrder lists the databases with idle backends, first victim first.
func (m *stateMachine) evictionOrder() []*smDB {
	var out []*smDB
	for _, D := range m.dbs {
		if D.d != nil && len(m.idleOf(D)) > 0 {
			out = append(out, D)
		}
	}
	sort.Slice(out, func(i, j int) bool { return m.evictsBefore(out[i], out[j]) })
	return out
}

type smPaceDial struct {
	at   time.Time
	took time.Duration
}

// paceDialed is the model of the dial pacing's AIMD after a successful
// dial: the baseline is the fastest dial since the start of the window
// before the current one (windows of a second, each starting with the
// first dial a second or more after the previous window's start); a dial
// over twice the baseline halves the slots (not below 4), once per epoch
// (only a dial granted since the last cut cuts); a slot's worth of dials
// within 1.5x the baseline adds one, up to the budget.
func (m *stateMachine) paceDialed(tk *smToken, took time.Duration) {
	now := m.clk.Now()
	// The windows' starts, replayed from every dial.
	var starts []time.Time
	for _, d := range append(m.paceDials, smPaceDial{now, took}) {
		if len(starts) == 0 || d.at.Sub(starts[len(starts)-1]) >= time.Second {
			starts = append(starts, d.at)
		}
	}
	m.paceDials = append(m.paceDials, smPaceDial{now, took})
	from := starts[len(starts)-1]
	if len(starts) > 1 && from.Sub(starts[len(starts)-2]) < 2*time.Second {
		from = starts[len(starts)-2]
	}
	base := took
	for _, d := range m.paceDials {
		if !d.at.Before(from) {
			base = min(base, d.took)
		}
	}
	if took > 2*base {
		if tk.epoch == m.paceEpoch {
			m.paceSlots = max(minDialSlots, min(m.paceSlots, m.limit())/2)
			m.paceEpoch++
			m.paceGood = 0
			m.logf("dial pacing: %d slots", m.paceSlots)
		}
		return
	}
	if 2*took <= 3*base {
		m.paceGood++
		if m.paceGood >= m.paceSlots {
			m.paceGood = 0
			if m.paceSlots < m.limit() {
				m.paceSlots++
				m.logf("dial pacing: %d slots", m.paceSlots)
			}
		}
	}
}

// slots is the number of dials (and claims) the pacing allows at once.
func (m *stateMachine) slots() int { return min(m.paceSlots, m.limit()) }

// srv returns the server of the model's databases (all on one), or an
// empty one while the budget has forgotten it.
func (m *stateMachine) srv() *server {
	if s := m.b.servers[serverKey{}]; s != nil {
		return s
	}
	return &server{}
}

// inFlightLocked counts the dials under way and the waiters promised the
// token of a backend being closed for them; b.mu is held.
func (m *stateMachine) inFlightLocked() int {
	n := len(m.dialingTokens())
	for _, sw := range m.waiters {
		if sw.w.claim != nil {
			n++
		}
	}
	return n
}

// victim is the idle backend the model says an eviction must close.
func (m *stateMachine) victim() *smBackend {
	for _, D := range m.evictionOrder() {
		if m.live(D) > D.reserved {
			return m.idleOf(D)[0]
		}
	}
	return nil
}

// victimFor is the idle backend the model says an eviction for a caller of
// D must close: a spare one first, of the first database in the eviction
// order that holds at least two live backends, for growth only if that
// backend has been idle for spareIdleAfter; failing that, for a miss (D
// holds no live backend) victim's, and for growth none.
func (m *stateMachine) victimFor(D *smDB) *smBackend {
	miss := m.live(D) == 0
	for _, x := range m.evictionOrder() {
		if l := m.live(x); l >= 2 && l > x.reserved {
			if v := m.idleOf(x)[0]; miss || m.clk.Now().Sub(v.idleSince) >= spareIdleAfter {
				return v
			}
			return nil
		}
	}
	if miss {
		return m.victim()
	}
	return nil
}

// simShrink is the model of a shrink: every database down to its cap, then
// the shared pool down to the budget, idle backends only.
func (m *stateMachine) simShrink() map[*smBackend]evictReason {
	out := map[*smBackend]evictReason{}
	live := map[*smDB]int{}
	idle := map[*smDB][]*smBackend{}
	for _, D := range m.dbs {
		if D.alive() {
			live[D] = m.live(D)
			idle[D] = m.idleOf(D)
		}
	}
	order := m.evictionOrder()
	for _, x := range order {
		for live[x] > m.capOf(x) && len(idle[x]) > 0 {
			out[idle[x][0]] = reasonBudgetShrink
			idle[x] = idle[x][1:]
			live[x]--
		}
	}
	shared := 0
	for D, l := range live {
		shared += max(0, l-D.reserved)
	}
	for shared > m.limit()-m.reservedSum() {
		var v *smBackend
		for _, x := range order {
			if len(idle[x]) > 0 && live[x] > x.reserved {
				v = idle[x][0]
				idle[x] = idle[x][1:]
				live[x]--
				shared--
				break
			}
		}
		if v == nil {
			break
		}
		out[v] = reasonBudgetShrink
	}
	return out
}

// reused is the model of a hit: D is promoted to the protected segment,
// which demotes the least recently used protected database with idle
// backends when the segment holds more than its share of the budget.
func (m *stateMachine) reused(D *smDB) {
	if !D.prot {
		D.prot = true
		pOpen := 0
		for _, x := range m.dbs {
			if x.d != nil && x.prot {
				pOpen += m.counts(x).open
			}
		}
		if pOpen > max(1, m.limit()*4/5) {
			var lru *smDB
			for _, x := range m.dbs {
				if x != D && x.d != nil && x.prot && len(m.idleOf(x)) > 0 && (lru == nil || x.touch < lru.touch) {
					lru = x
				}
			}
			if lru != nil {
				lru.prot = false
				lru.demoted = m.seq
				m.cov.demotions++
				m.logf("%s demoted", lru.ws)
			}
		}
	}
	if len(m.idleOf(D)) > 0 {
		D.touch = m.seq
	}
}

func (m *stateMachine) expiry(mb *smBackend) time.Time {
	at := mb.idleSince.Add(m.cfg.ConnMaxIdleTime)
	if l := m.cfg.ConnMaxLifetime; l > 0 && mb.created.Add(l).Before(at) {
		at = mb.created.Add(l)
	}
	return at
}

func (m *stateMachine) newID() int { m.ids++; return m.ids }

// The run.

var (
	smIdleTimeouts = [4]time.Duration{time.Hour, time.Hour, 2 * time.Second, 200 * time.Millisecond}
	smLifetimes    = [4]time.Duration{time.Hour, time.Hour, 3 * time.Second, 400 * time.Millisecond}
	smHandoffAfter = [3]time.Duration{defaultHandoffAfter, 0, time.Hour}
	smDeltas       = [8]time.Duration{time.Millisecond, 3 * time.Millisecond, 10 * time.Millisecond, 30 * time.Millisecond,
		100 * time.Millisecond, 300 * time.Millisecond, time.Second, 5 * time.Second}
	smUseTimes = [8]time.Duration{0, time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond,
		10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond, 120 * time.Millisecond}
	smDialTimes = [8]time.Duration{time.Millisecond, 2 * time.Millisecond, 3 * time.Millisecond, 5 * time.Millisecond,
		8 * time.Millisecond, 13 * time.Millisecond, 21 * time.Millisecond, 40 * time.Millisecond}
	errSMDial = errors.New("dial failed (model)")
)

func smConfig(limit, perDB int, idle, life time.Duration) Config {
	cfg, err := Config{MaxConnections: limit, MaxConnectionsPerDB: min(perDB, limit), AcquireTimeout: time.Hour,
		ConnMaxIdleTime: idle, ConnMaxLifetime: life}.normalize()
	if err != nil {
		panic(err)
	}
	return cfg
}

// runStateMachine interprets data as a setup and a sequence of events.
func runStateMachine(t testing.TB, data []byte, cov *smCov) {
	if len(data) < 4 {
		return
	}
	if cov == nil {
		cov = &smCov{}
	}
	limit := 1 + int(data[0]%5)
	cfg := smConfig(limit, 1+int(data[1]%3), smIdleTimeouts[data[1]>>2&3], smLifetimes[data[1]>>4&3])
	nDB := 1 + int(data[2]%6)
	handoffAfter := smHandoffAfter[int(data[2]>>3)%3]
	reserve := min([4]int{0, 0, 1, 2}[data[3]&3], limit-1)
	maxConns1 := min([4]int{0, 1, 2, 3}[data[3]>>2&3], limit)
	data = data[4:]

	clk := &smClock{now: smEpoch}
	io := &smIO{broke: map[*backend]bool{}, sockOpen: map[*backend]bool{}}
	b := newBudget(cfg, clk, io)
	io.b = b
	b.handoffAfter = handoffAfter
	m := &stateMachine{t: t, b: b, clk: clk, io: io, cfg: cfg, handoffAfter: handoffAfter,
		backends: map[*backend]*smBackend{}, byW: map[*waiter]*smWaiter{}, results: make(chan smResult, 64),
		roles: map[*smTimer]any{}, cov: cov}
	m.paceSlots = initialDialSlots
	m.logf("limit %d perDB %d idle %s life %s dbs %d handoffAfter %s reserve(ws0) %d maxConns(ws1) %d",
		limit, cfg.MaxConnectionsPerDB, cfg.ConnMaxIdleTime, cfg.ConnMaxLifetime, nDB, handoffAfter, reserve, maxConns1)
	for i := 0; i < nDB; i++ {
		D := &smDB{i: i, ws: fmt.Sprint("ws", i)}
		m.dbs = append(m.dbs, D)
		res, mc := 0, 0
		if i == 0 {
			res = reserve
		}
		if i == 1 {
			mc = maxConns1
		}
		m.register(D, res, mc)
	}
	for n := 0; len(data) >= 2 && n < smMaxEvents; n++ {
		op, arg := smOps[int(data[0])%len(smOps)], int(data[1])
		data = data[2:]
		m.step(op, arg)
		m.runFollowups()
	}
	m.finish()
}

// smMaxEvents bounds a run: the rest of a longer input is ignored.
const smMaxEvents = 1500

const (
	opTake = iota
	opQuery
	opDialOK
	opDialFail
	opReject
	opCheckin
	opBreak
	opDrain
	opGiveUp
	opFire
	opRunPending
	opAdvance
	opReconfigure
	opRegister
	opUnregister
	opClose
)

// smOps maps an event byte to an event, weighted so that sequences reach
// full budgets, idle backends in several databases, and queues.
var smOps = []int{
	opTake, opTake, opTake, opTake,
	opQuery, opQuery, opQuery, opQuery, opQuery, opQuery,
	opDialOK, opDialOK, opDialOK, opDialOK,
	opDialFail, opReject,
	opCheckin, opCheckin, opCheckin, opCheckin, opCheckin, opCheckin, opCheckin, opCheckin,
	opBreak,
	opDrain, opDrain, opDrain, opDrain, opDrain, opDrain, opDrain,
	opGiveUp, opGiveUp,
	opFire, opFire, opRunPending,
	opAdvance, opAdvance,
	opReconfigure, opRegister, opUnregister, opClose,
}

func (m *stateMachine) step(op, arg int) {
	switch op {
	case opTake:
		i := arg % len(m.dbs)
		if arg&0x20 == 0 {
			// Mostly a database nobody waits on: queues in some
			// databases, idle backends in others.
			for k := range m.dbs {
				if D := m.dbs[(i+k)%len(m.dbs)]; D.regs > 0 && len(m.waitersOf(D)) == 0 {
					i = (i + k) % len(m.dbs)
					break
				}
			}
		}
		D := m.dbs[i]
		if D.d == nil || D.regs == 0 || len(m.waiters) >= 6 {
			return
		}
		m.take(D, arg&0xc0 == 0xc0)
	case opQuery:
		// A short query on a database: served at once from an idle
		// backend or a free token, it runs and checks in; otherwise it
		// stays in line.
		D := m.dbs[arg%len(m.dbs)]
		if D.d == nil || D.regs == 0 || len(m.waiters) >= 6 {
			return
		}
		mb, sw := m.take(D, false)
		if sw != nil && sw.tok != nil && sw.tok.dialing {
			m.dialOK(sw.tok, arg)
			mb = sw.tok.be
		}
		if mb != nil && mb.state == smBusy {
			m.advance(smUseTimes[arg>>5])
			m.checkin(mb)
		}
	case opDialOK:
		if toks := m.dialingTokens(); len(toks) > 0 {
			m.dialOK(toks[arg%len(toks)], arg)
		}
	case opDialFail:
		if toks := m.dialingTokens(); len(toks) > 0 {
			m.dialFail(toks[arg%len(toks)], arg)
		}
	case opReject:
		if toks := m.dialingTokens(); len(toks) > 0 {
			m.reject(toks[arg%len(toks)])
		}
	case opCheckin:
		if busy := m.busyBackends(); len(busy) > 0 {
			mb := busy[arg%len(busy)]
			m.advance(smUseTimes[arg>>5])
			m.checkin(mb)
		}
	case opBreak:
		var cands []*smBackend
		for _, mb := range m.alive {
			if !mb.broken {
				cands = append(cands, mb)
			}
		}
		if len(cands) > 0 {
			m.breakBackend(cands[arg%len(cands)], arg&0x40 != 0)
		}
	case opDrain:
		if len(m.draining) > 0 {
			m.drain(m.draining[arg%len(m.draining)])
		}
	case opGiveUp:
		if len(m.waiters) > 0 {
			m.giveUp(m.waiters[arg%len(m.waiters)], arg&0x40 != 0)
		}
	case opFire:
		// The next timer, if due within a horizon: jumping an hour to
		// the reaper would expire everything idle.
		horizon := m.clk.Now().Add(smDeltas[arg>>2&7])
		if t := m.clk.earliest(); t != nil && (!t.at.After(horizon) || arg&3 == 0 && arg&0x20 != 0) {
			m.fire(t, arg&0xc0 == 0xc0)
		}
	case opRunPending:
		if len(m.pending) > 0 {
			t := m.pending[0]
			m.pending = m.pending[1:]
			m.runTimer(t)
		}
	case opAdvance:
		m.advance(smDeltas[arg%len(smDeltas)])
	case opReconfigure:
		if arg&0x80 == 0 || arg&1 == 0 {
			m.reconfigure(arg)
		}
	case opRegister:
		// Every registration is a new pool: only a forgotten one is
		// opened again.
		D := m.dbs[arg%len(m.dbs)]
		if D.d != nil {
			return
		}
		reserved, maxConns := [4]int{0, 0, 1, 2}[arg>>3&3], [8]int{0, 0, 0, 1, 2, 3, 4, 6}[arg>>5]
		if maxConns > 0 {
			reserved = min(reserved, maxConns)
		}
		m.register(D, reserved, maxConns)
	case opUnregister:
		var regd []*smDB
		for _, D := range m.dbs {
			if D.regs > 0 {
				regd = append(regd, D)
			}
		}
		if len(regd) > 0 && arg&3 == 0 {
			m.closeDB(regd[arg>>2%len(regd)])
		}
	case opClose:
		if arg%64 == 0 && !m.closed {
			m.cov.closes++
			m.closeDriver()
		}
	}
}

func (m *stateMachine) runFollowups() {
	for len(m.followups) > 0 {
		f := m.followups[0]
		m.followups = m.followups[1:]
		f()
	}
}

// sub runs one call into the budget, then collects what it caused and
// checks the budget against the model.
func (m *stateMachine) sub(desc string, op func()) { m.subf("%s", desc)(op) }

// subf is sub with a description formatted only if the run fails.
func (m *stateMachine) subf(format string, args ...any) func(op func()) {
	return func(op func()) { m.run(op, format, args...) }
}

func (m *stateMachine) run(op func(), format string, args ...any) {
	m.t.Helper()
	m.seq++
	m.logf(format, args...)
	m.observe()
	m.exp = smExpect{idle: map[*smBackend]evictReason{}}
	op()
	m.settle()
	m.check()
}

// observe records what the model reads of the budget's decisions before a
// sub-step: which waiters seek a token, with a claim or not, in which order.
func (m *stateMachine) observe() {
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	m.preQueue = m.preQueue[:0]
	sv := m.srv()
	for w := sv.queue.front; w != nil; w = sv.queue.next(w) {
		sw := m.byW[w]
		if sw == nil {
			m.locked = true
			m.fail("a caller the model does not know is in the budget's queue")
		}
		m.preQueue = append(m.preQueue, sw)
	}
	for _, sw := range m.waiters {
		sw.preSeeking, sw.preClaim, sw.granted = sw.w.seekingLocked(), sw.w.claim != nil, false
	}
	m.preOpen, m.preShared, m.preReserved = b.open, sv.sharedInUse, m.reservedSum()
	m.preInFlight = m.inFlightLocked()
	m.preLive = map[*smDB]int{}
	for _, D := range m.dbs {
		m.preLive[D] = m.live(D)
		D.protAmbiguous = false
		D.owed = 0
	}
	m.grantedNow = m.grantedNow[:0]
	m.released = map[*smDB]bool{}
}

func (m *stateMachine) receive() smResult {
	select {
	case r := <-m.results:
		return r
	case <-time.After(smHang):
		m.fail("a waiter the budget served or failed did not return from await")
	}
	panic("unreachable")
}

// settle collects the results of the waiters the sub-step served or failed,
// the backends it closed and the tokens it released, and updates the model.
func (m *stateMachine) settle() {
	b := m.b
	// Waiters served or failed.
	b.mu.Lock()
	var done []*smWaiter
	for _, sw := range m.waiters {
		if sw.w.done {
			done = append(done, sw)
		}
	}
	b.mu.Unlock()
	got := map[int]smResult{}
	for len(got) < len(done) {
		r := m.receive()
		got[r.id] = r
	}
	grants := map[*smDB]int{}
	for _, sw := range done {
		r, ok := got[sw.id]
		if !ok {
			m.fail("waiter w%d is done but another waiter returned", sw.id)
		}
		m.dropWaiter(sw)
		D := sw.db
		if r.err == nil {
			D.owe(m.clk.Now().Sub(sw.since))
		}
		switch {
		case r.err != nil:
			if !m.closed || !errors.Is(r.err, errDriverClosed) {
				m.fail("waiter w%d failed: %v", sw.id, r.err)
			}
			m.logf("waiter w%d (%s) fails: driver closed", sw.id, D.ws)
			m.followups = append(m.followups, func() { m.closeHandle(D) })
		case r.be != nil:
			if m.exp.handoffTo != sw || m.exp.busy == nil || r.be != m.exp.busy.be || r.tok != nil {
				exp := -1
				if m.exp.handoffTo != nil {
					exp = m.exp.handoffTo.id
				}
				m.fail("waiter w%d of %s was handed backend %d; the model hands the checked-in backend to w%d",
					sw.id, D.ws, m.backends[r.be].id, exp)
			}
			m.exp.handedOff = true
			m.logf("waiter w%d (%s) gets backend %d handed over", sw.id, D.ws, m.exp.busy.id)
		case r.tok != nil:
			if r.tok.db != D.d {
				m.fail("waiter w%d of %s got a token of another database", sw.id, D.ws)
			}
			if m.preLive[D]+grants[D] > 0 {
				m.cov.growth++
			}
			grants[D]++
			m.dials++
			sw.granted = true
			m.grantedNow = append(m.grantedNow, sw)
			sw.tok = &smToken{db: D, tok: r.tok, dialing: true, epoch: m.paceEpoch}
			if r.tok.paceEpoch != m.paceEpoch {
				m.fail("waiter w%d granted in pacing epoch %d; the model is in %d", sw.id, r.tok.paceEpoch, m.paceEpoch)
			}
			m.tokens = append(m.tokens, sw.tok)
			m.logf("waiter w%d (%s) gets a token: dials", sw.id, D.ws)
		default:
			m.fail("waiter w%d returned nothing", sw.id)
		}
	}
	if m.exp.handoffTo != nil && !m.exp.handedOff {
		m.fail("the checked-in backend %d was not handed to w%d, the first waiter of %s", m.exp.busy.id, m.exp.handoffTo.id, m.exp.busy.db.ws)
	}

	// Backends closed.
	var lru []*smBackend
	busyClosed := false
	closed := m.io.takeClosed()
	for _, be := range closed {
		mb := m.backends[be]
		if mb == nil {
			m.fail("the driver closed a backend the model does not know")
		}
		var reason evictReason
		switch mb.state {
		case smClosing:
			m.fail("backend %d closed twice", mb.id)
		case smIdle:
			if r, ok := m.exp.idle[mb]; ok {
				reason = r
				delete(m.exp.idle, mb)
			} else {
				reason = reasonLRU
				lru = append(lru, mb)
				m.cov.evictions++
			}
		case smBusy:
			if mb != m.exp.busy || m.exp.busyReason == reasonNone {
				m.fail("busy backend %d of %s closed under its caller", mb.id, mb.db.ws)
			}
			reason = m.exp.busyReason
			busyClosed = true
		}
		m.logf("backend %d (%s) closed: %s", mb.id, mb.db.ws, reasonNames[reason])
		m.evictions[reason]++
		switch reason {
		case reasonBudgetShrink:
			m.cov.shrinks++
		case reasonUnused:
			m.cov.unused++
		}
		mb.state = smClosing
		mb.tok.closing, mb.tok.ended = true, true
		if s := mb.sock; s != nil && !s.draining {
			s.draining = true // io.close started its drain
			m.draining = append(m.draining, s)
		}
		for i, x := range m.alive {
			if x == mb {
				m.alive = append(m.alive[:i], m.alive[i+1:]...)
				break
			}
		}
	}
	for mb, r := range m.exp.idle {
		m.fail("idle backend %d of %s was not closed (%s)", mb.id, mb.db.ws, reasonNames[r])
	}
	if m.exp.busy != nil && m.exp.busyReason != reasonNone && !busyClosed {
		m.fail("backend %d of %s was not closed (%s)", m.exp.busy.id, m.exp.busy.db.ws, reasonNames[m.exp.busyReason])
	}
	// Evictions for callers that need a token follow the recency order:
	// no backend left idle ranks before one closed, unless it sits within
	// its database's reservation; within a database, longest idle first.
	// A spare backend goes first, the first in that order among databases
	// holding two live backends or more; only a miss takes a last backend,
	// the first of all, when no spare one is left. The claimant is known
	// while it still waits with the claim.
	b.mu.Lock()
	grower := map[*smBackend]bool{}
	for _, v := range lru {
		for _, sw := range m.waiters {
			if sw.w.claim != nil && sw.w.claim == v.tok.tok {
				// It grew if its database held a live backend when it
				// chose: one now, less those granted in this sub-step
				// (perhaps after it chose), is a lower bound.
				grower[v] = m.live(sw.db)-grants[sw.db] > 0
				if grower[v] {
					m.cov.spareTaken++
					if idle := m.clk.Now().Sub(v.idleSince); idle < spareIdleAfter {
						b.mu.Unlock()
						m.fail("w%d of %s, which holds a backend, evicted backend %d of %s idle for only %s", sw.id, sw.db.ws, v.id, v.db.ws, idle)
					}
				}
				// v.db's live backends when v was chosen: at most those
				// live now and those closed in this sub-step (a close
				// chosen later may run first: a token released while
				// closing serves the queue again).
				liveThen := m.live(v.db)
				for _, be := range closed {
					if m.backends[be].db == v.db {
						liveThen++
					}
				}
				if grower[v] && liveThen < 2 {
					b.mu.Unlock()
					m.fail("w%d of %s, which holds a backend, evicted the last backend %d of %s", sw.id, sw.db.ws, v.id, v.db.ws)
				}
			}
		}
	}
	b.mu.Unlock()
	for _, v := range lru {
		for _, mb := range m.alive {
			if mb.state != smIdle {
				continue
			}
			if mb.db == v.db {
				if mb.idleSeq < v.idleSeq {
					m.fail("backend %d of %s evicted before backend %d, idle longer", v.id, v.db.ws, mb.id)
				}
				continue
			}
			if m.live(mb.db) <= mb.db.reserved || m.live(v.db) > 0 && m.live(mb.db) < 2 {
				continue // a spare victim ranks only among spare backends
			}
			if m.live(v.db) == 0 && m.live(mb.db) >= 2 {
				m.fail("the last backend %d of %s evicted while %s kept spare backend %d", v.id, v.db.ws, mb.db.ws, mb.id)
			}
			m.cov.lruCompared++
			if m.evictsBefore(mb.db, v.db) {
				vs, vu := m.rank(v.db)
				ks, ku := m.rank(mb.db)
				m.fail("%s (segment %d, used at %d) evicted while %s (segment %d, used at %d) kept idle backend %d",
					v.db.ws, vs, vu, mb.db.ws, ks, ku, mb.id)
			}
		}
	}

	// Tokens released: their owner is done and every socket drained.
	m.settleTokens(grants)
}

func (m *stateMachine) settleTokens(grants map[*smDB]int) {
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	m.locked = true
	defer func() { m.locked = false }()
	kept := m.tokens[:0]
	for _, tk := range m.tokens {
		if tk.ended && len(tk.sockets) == 0 {
			tk.released = true
			m.released[tk.db] = true
			if !tk.tok.released {
				m.fail("a token of %s is not released though its owner is done and its sockets drained", tk.db.ws)
			}
			if tk.gone != nil {
				select {
				case <-tk.gone:
				default:
					m.fail("relieveServer's channel not closed when its backend's token returned")
				}
			}
			continue
		}
		if tk.tok.released {
			m.fail("a token of %s released early (dialing %v ended %v sockets %d)", tk.db.ws, tk.dialing, tk.ended, len(tk.sockets))
		}
		if tk.gone != nil {
			select {
			case <-tk.gone:
				m.fail("relieveServer's channel closed before its backend's token returned")
			default:
			}
		}
		kept = append(kept, tk)
	}
	m.tokens = kept
	for D := range m.released {
		switch {
		case grants[D] > 0:
			D.protAmbiguous = true
		case m.counts(D).open == 0:
			D.prot = false
		}
	}
}

func (m *stateMachine) dropWaiter(sw *smWaiter) {
	for i, x := range m.waiters {
		if x == sw {
			m.waiters = append(m.waiters[:i], m.waiters[i+1:]...)
			break
		}
	}
	delete(m.byW, sw.w)
	sw.db.awaiting--
	sw.ctx.end(context.Canceled) // its goroutine has returned: release the context
	if t := sw.patience; t != nil {
		if _, active := t.state(); active {
			m.fail("waiter w%d left the queue with its patience timer still armed", sw.id)
		}
		m.dropTimer(t)
	}
}

// dropTimer forgets a waiter's patience timer once it can do nothing more:
// stopped or fired, and its callback run.
func (m *stateMachine) dropTimer(t *smTimer) {
	for _, p := range m.pending {
		if p == t {
			return // runTimer drops it
		}
	}
	m.clk.forget(t)
	delete(m.roles, t)
}

// check compares the budget with the model after a sub-step.
func (m *stateMachine) check() {
	m.t.Helper()
	if m.closed {
		m.checkCloseReturn()
	}
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	m.locked = true
	defer func() { m.locked = false }()
	if err := b.checkInvariantsLocked(); err != nil {
		m.fail("invariant: %v", err)
	}
	// Timers: every one armed belongs to the reaper or to a waiter.
	for _, t := range m.clk.all() {
		if _, ok := m.roles[t]; ok {
			continue
		}
		if rt, ok := b.reaper.timer.(*smTimer); ok && rt == t {
			m.roles[t] = smReaper{}
			continue
		}
		m.fail("a timer armed for something the model does not know")
	}

	// Databases: forgotten exactly when nothing uses them and they hold no
	// token; otherwise the budget's numbers are the model's.
	totalOpen := 0
	anyState := false
	for _, D := range m.dbs {
		c := m.counts(D)
		totalOpen += c.open
		if D.d == nil {
			continue
		}
		if D.refs() == 0 && c.open == 0 {
			if _, listed := b.dbs[D.d]; listed {
				m.fail("%s: nothing uses it and it holds nothing, yet it is not forgotten", D.ws)
			}
			m.logf("%s forgotten", D.ws)
			*D = smDB{i: D.i, ws: D.ws}
			continue
		}
		d := D.d
		if _, listed := b.dbs[d]; !listed {
			m.fail("%s: forgotten while used (refs %d) or holding %d tokens", D.ws, D.refs(), c.open)
		}
		if d.open != c.open || d.closing != c.closing || d.dialing != c.dialing || d.inUse != c.busy || d.idle != c.idle {
			m.fail("%s: open %d closing %d dialing %d inUse %d idle %d; the model: %d %d %d %d %d",
				D.ws, d.open, d.closing, d.dialing, d.inUse, d.idle, c.open, c.closing, c.dialing, c.busy, c.idle)
		}
		if d.refs != D.refs() {
			m.fail("%s: refs %d, the model %d (regs %d handles %d awaiting %d)", D.ws, d.refs, D.refs(), D.regs, D.handles, D.awaiting)
		}
		anyState = true
		if d.reserved != D.reserved || d.capOverride != D.maxConns || b.capLocked(d) != m.capOf(D) {
			m.fail("%s: reserved %d maxConns %d cap %d; the model %d %d %d", D.ws, d.reserved, d.capOverride, b.capLocked(d), D.reserved, D.maxConns, m.capOf(D))
		}
		if float64(d.useTime) != D.useTime {
			m.fail("%s: use time %v, the model %v", D.ws, float64(d.useTime), D.useTime)
		}
		if d.protected != D.prot {
			if !D.protAmbiguous {
				m.fail("%s: protected %v, the model %v", D.ws, d.protected, D.prot)
			}
			D.prot = d.protected
		}
		idle := m.idleOf(D)
		i := len(idle) - 1
		for be := d.idleBackends.front; be != nil; be = d.idleBackends.next(be) {
			if i < 0 || idle[i].be != be {
				m.fail("%s: idle list out of order: the most recently checked in must come first", D.ws)
			}
			i--
		}
		ws := m.waitersOf(D)
		i = 0
		for w := d.waiters.front; w != nil; w = d.waiters.next(w) {
			if i >= len(ws) || ws[i].w != w {
				m.fail("%s: waiters out of arrival order", D.ws)
			}
			i++
		}
	}
	if !anyState {
		// The budget forgets a server with its last database, dial pacing
		// included: the next database on it starts from scratch.
		if len(b.servers) != 0 {
			m.fail("no database state left, yet %d servers kept", len(b.servers))
		}
		if m.paceSlots != initialDialSlots || m.paceGood != 0 || m.paceEpoch != 0 || len(m.paceDials) != 0 {
			m.logf("server forgotten: dial pacing restarts")
		}
		m.paceSlots, m.paceGood, m.paceEpoch, m.paceDials = initialDialSlots, 0, 0, nil
	}
	_, sharedLive := m.shared()
	switch {
	case b.open != totalOpen:
		m.fail("budget holds %d tokens; the model counts %d", b.open, totalOpen)
	case m.srv().reserved != m.reservedSum():
		m.fail("budget reserves %d; the model %d", m.srv().reserved, m.reservedSum())
	case b.waiting != len(m.waiters):
		m.fail("budget has %d waiting; the model %d", b.waiting, len(m.waiters))
	case float64(b.dialTime) != m.dialTime:
		m.fail("dial time %v, the model %v", float64(b.dialTime), m.dialTime)
	case b.evictions != m.evictions:
		m.fail("evictions %v, the model %v", b.evictions, m.evictions)
	case m.waitAmbiguous && b.waitCount == m.waitCount+1:
		m.waitCount++
	}
	m.waitAmbiguous = false
	switch {
	case b.handoffs != m.handoffs || b.dials != m.dials || b.exhausted != m.exhausted || b.timeouts != m.timeouts || b.waitCount != m.waitCount:
		m.fail("handoffs %d dials %d exhausted %d timeouts %d waits %d; the model %d %d %d %d %d",
			b.handoffs, b.dials, b.exhausted, b.timeouts, b.waitCount, m.handoffs, m.dials, m.exhausted, m.timeouts, m.waitCount)
	case b.dialErrors != m.dialErrors:
		m.fail("dial errors %v, the model %v", b.dialErrors, m.dialErrors)
	}
	for _, mb := range m.alive {
		want := map[smBState]backendState{smBusy: backendBusy, smIdle: backendIdle}[mb.state]
		if mb.be.state != want {
			m.fail("backend %d of %s in state %d; the model %d", mb.id, mb.db.ws, mb.be.state, want)
		}
	}

	// Safety: the open count never grows beyond the budget, nor a
	// database's live backends beyond its cap; a lowered limit leaves more
	// open only until busy backends come back.
	if b.open > b.limit && (b.open > m.preOpen || !m.lowered) {
		m.fail("open %d over the budget %d (was %d)", b.open, b.limit, m.preOpen)
	}
	if inUse, _ := m.shared(); inUse > m.limit()-m.reservedSum() && inUse > m.preShared && m.reservedSum() == m.preReserved {
		m.fail("the shared pool grew to %d over its %d", inUse, m.limit()-m.reservedSum())
	}
	for _, D := range m.dbs {
		if D.d == nil {
			continue
		}
		if l := m.live(D); l > m.capOf(D) && l > m.preLive[D] {
			m.fail("%s grew to %d live backends over its cap %d", D.ws, l, m.capOf(D))
		}
		if len(m.idleOf(D)) > 0 && m.overLimit(D) && !(m.live(D) <= D.reserved) {
			if m.live(D) > m.capOf(D) || sharedLive > m.limit()-m.reservedSum() {
				m.fail("%s is over its limits with an idle backend left", D.ws)
			}
		}
	}

	// Liveness: no caller waits for a token while a victim could be
	// evicted for it; the reaper is armed for the earliest idle expiry.
	// Pacing: no dial or claim starts beyond the slots.
	inFlight := m.inFlightLocked()
	if inFlight > m.slots() && inFlight > m.preInFlight {
		m.fail("%d dials and claims under way, over the %d dial slots (was %d)", inFlight, m.slots(), m.preInFlight)
	}
	sv := m.srv()
	if sv.claims != inFlight-len(m.dialingTokens()) {
		m.fail("the budget counts %d claims; %d waiters hold one", sv.claims, inFlight-len(m.dialingTokens()))
	}
	for w := sv.queue.front; w != nil && inFlight < m.slots(); w = sv.queue.next(w) {
		if D := m.byW[w].db; w.claim == nil && m.room(D) && m.live(D) < m.capOf(D) {
			m.fail("a caller of %s waits for a token while one is free for it", D.ws)
		}
		if w.claim == nil && m.live(m.byW[w].db) > 0 && m.victimFor(m.byW[w].db) == nil && m.victim() != nil {
			m.cov.growthHeld++
		}
		// A grower waits for a spare backend to age only until the next
		// event on the server (no timer marks the moment): only misses
		// are held to it here; the growth victims taken are checked in
		// settle.
		if victim := m.victimFor(m.byW[w].db); w.claim == nil && victim != nil && m.live(m.byW[w].db) == 0 {
			m.fail("a caller of %s waits for a token while backend %d of %s could be evicted for it", w.db.workspace, victim.id, victim.db.ws)
		}
	}
	var first time.Time
	idle := 0
	for _, mb := range m.alive {
		if mb.state == smIdle {
			idle++
			if at := m.expiry(mb); first.IsZero() || at.Before(first) {
				first = at
			}
		}
	}
	if now := m.clk.Now(); idle > 0 && first.Before(now) {
		first = now // past due: armed for now is in time
	}
	if idle > 0 {
		if m.closed {
			m.fail("an idle backend after Close")
		}
		ok := false
		for t, role := range m.roles {
			if _, r := role.(smReaper); r {
				at, active := t.state()
				ok = ok || active && !at.After(first)
				for _, p := range m.pending {
					ok = ok || p == t
				}
			}
		}
		if !ok {
			m.fail("idle backends, the first expiring at %s, and no reaper armed by then", first.Sub(smEpoch))
		}
	}

	// Patience lasts a dial, twice that when the budget is full (the dial
	// evicts): the room take saw is the room now, unless a token came back
	// as take returned.
	if sw := m.armed; sw != nil && len(m.released) == 0 {
		want := time.Duration(m.dialTime)
		if !m.room(sw.db) {
			want *= 2
		}
		if sw.patienceFor != want {
			m.fail("w%d: patience armed for %s; a dial costs %s (room %v)", sw.id, sw.patienceFor, want, m.room(sw.db))
		}
	}
	m.armed = nil

	// Wait-or-dial: a waiter starts seeking a token only when the queue
	// justifies a dial (or its patience ran out), and a queue that
	// justifies one has a seeker after growLocked ran.
	dt := time.Duration(m.dialTime)
	for _, D := range m.dbs {
		if D.d == nil {
			continue
		}
		starts := 0
		for _, sw := range append(m.waitersOf(D), m.grantedNow...) {
			if sw.db == D && sw != m.exp.patience && !sw.preSeeking && (sw.granted || sw.w.seekingLocked()) {
				starts++
			}
		}
		n := m.live(D) + D.d.seeking
		q := D.d.waiters.len - D.d.seeking
		if starts > 0 && !m.shouldDial(D, n-1, q+1, dt, D.debt) {
			m.fail("%s: a waiter started seeking a token though %d backends serve %d queued callers (use time %s, dial %s, waits owed at most %s)",
				D.ws, n-1, q+1, time.Duration(D.useTime), dt, time.Duration(D.debt))
		}
		if starts > 0 && m.exp.patience == nil {
			D.debt = D.owed // paid by the dial, but for what may have been owed since
		}
		if D.d.waitDebt > D.debt*(1+1e-9)+1 {
			m.fail("%s: wait debt %s, more than the %s waited since the last dial", D.ws, time.Duration(D.d.waitDebt), time.Duration(D.debt))
		}
	}
	for _, D := range m.exp.grow {
		if D.d == nil {
			continue
		}
		n := m.live(D) + D.d.seeking
		q := D.d.waiters.len - D.d.seeking
		if q > 0 && m.shouldDial(D, n, q, 2*dt, -1) {
			m.fail("%s: %d callers wait on %d backends (use time %s, dial %s) and none seeks a token",
				D.ws, q, n, time.Duration(D.useTime), dt)
		}
	}
}

// checkCloseReturn: Driver.Close returns once every socket has drained,
// and not before.
func (m *stateMachine) checkCloseReturn() {
	if m.closeReturned {
		return // busy backends checked in later are closed without it
	}
	if len(m.draining) == 0 {
		select {
		case <-m.closeDone:
			m.closeReturned = true
		case <-time.After(smHang):
			m.fail("Close did not return though every socket has drained")
		}
		return
	}
	select {
	case <-m.closeDone:
		m.fail("Close returned with %d sockets still draining", len(m.draining))
	default:
	}
}

// Events.

func (m *stateMachine) register(D *smDB, reserved, maxConns int) {
	p := &dsnParams{cfg: &pgx.ConnConfig{}, workspace: D.ws, maxConns: maxConns, reserved: reserved}
	p.cfg.Database = "db" + D.ws
	m.subf("%s: register reserved %d maxConns %d", D.ws, reserved, maxConns)(func() {
		others := m.reservedSum()
		if D.d != nil {
			others -= D.reserved
		}
		var want string
		switch {
		case m.closed:
			want = "closed"
		case maxConns > m.limit(), others+reserved > m.limit():
			want = "dsn"
		}
		if want == "" {
			// The model of what register does before it shrinks.
			D.reserved, D.maxConns = reserved, maxConns
			D.regs, D.closed = 1, false
			m.exp.idle = m.simShrink()
			m.exp.grow = []*smDB{D}
		}
		d, err := m.b.register(p)
		var dsnErr *DSNError
		switch want {
		case "closed":
			if !errors.Is(err, errDriverClosed) {
				m.fail("register after Close: %v", err)
			}
		case "dsn":
			if !errors.As(err, &dsnErr) {
				m.fail("register: want a DSNError, got %v", err)
			}
		default:
			if err != nil {
				m.fail("register: %v", err)
			}
			for _, x := range m.dbs {
				if x.d == d {
					m.fail("register reused another pool's state")
				}
			}
			D.d = d
		}
	})
}

func (m *stateMachine) expectUnregister(D *smDB) {
	if D.refs() == 0 {
		for _, mb := range m.idleOf(D) {
			m.exp.idle[mb] = reasonUnused
		}
	}
}

// closeDB: D's *sql.DB is closed, and its connector with it: its idle
// backends close at once, whatever handles remain.
func (m *stateMachine) closeDB(D *smDB) {
	m.subf("%s: its *sql.DB is closed", D.ws)(func() {
		D.regs--
		D.closed = true
		for _, mb := range m.idleOf(D) {
			m.exp.idle[mb] = reasonUnused
		}
		m.b.closeOwner(D.d, &owner{})
	})
}

// closeHandle: the handle that made a checkout is done with it.
func (m *stateMachine) closeHandle(D *smDB) {
	m.subf("%s: handle closed", D.ws)(func() {
		D.handles--
		m.expectUnregister(D)
		m.b.unregister(D.d)
	})
}

// take is a checkout by a new handle: the most recently checked-in idle
// backend, or a wait in line. A backend found dead is discarded and the
// checkout starts over, as connector.checkout does.
func (m *stateMachine) take(D *smDB, dead bool) (got *smBackend, queued *smWaiter) {
	retained := false
	for {
		var be *backend
		var mb *smBackend
		m.subf("%s: take", D.ws)(func() {
			if !retained {
				retained = true
				D.handles++
				// A handle of the model; after Close the driver's retain
				// refuses, and take fails the same way below.
				m.b.mu.Lock()
				D.d.refs++
				m.b.mu.Unlock()
			}
			now := m.clk.Now()
			if idle := m.idleOf(D); len(idle) > 0 {
				mb = idle[len(idle)-1]
			}
			var w *waiter
			var err error
			be, w, err = m.b.take(D.d, now, nil)
			switch {
			case m.closed:
				if !errors.Is(err, errDriverClosed) || be != nil || w != nil {
					m.fail("take after Close: %v", err)
				}
				m.followups = append(m.followups, func() { m.closeHandle(D) })
			case err != nil:
				m.fail("take: %v", err)
			case mb != nil:
				if be != mb.be {
					m.fail("%s: take did not return backend %d, the most recently checked in", D.ws, mb.id)
				}
				mb.state, mb.checkedOut = smBusy, now
				m.reused(D)
				m.cov.reuses++
				m.logf("takes idle backend %d", mb.id)
			case be != nil || w == nil:
				m.fail("%s: take returned a backend while the model has none idle", D.ws)
			default:
				queued = m.queue(D, w, now)
			}
		})
		if mb == nil || !(mb.broken || dead) {
			return mb, queued
		}
		dead = false
		m.subf("%s: backend %d found dead: discard", D.ws, mb.id)(func() {
			m.exp.busy, m.exp.busyReason = mb, reasonBroken
			m.exp.grow = []*smDB{D}
			m.cov.discards++
			m.b.discard(be)
		})
	}
}

// queue records a new waiter, checks its patience timer and starts the
// goroutine that waits in await.
func (m *stateMachine) queue(D *smDB, w *waiter, now time.Time) *smWaiter {
	sw := &smWaiter{id: m.newID(), db: D, w: w, since: now, ctx: newSMCtx(), caller: newSMCtx()}
	m.waiters = append(m.waiters, sw)
	m.byW[w] = sw
	D.awaiting++
	m.exp.grow = []*smDB{D}
	b := m.b
	b.mu.Lock()
	seeking, done, pt := w.seekingLocked(), w.done, w.patience
	b.mu.Unlock()
	m.logf("waits as w%d (seeking %v, served %v)", sw.id, seeking, done)
	if !done {
		m.waitCount++
		m.cov.waits++
	} else {
		// Served by the time take returned, but maybe only by a token
		// released as take closed the backend it evicted for it: then
		// it was counted as waiting. check reconciles.
		m.waitAmbiguous = true
	}
	if seeking || done {
		// No patience is needed, though a timer may have been armed
		// before the waiter came to seek or was served as take
		// returned: it must be harmless (seeking) or stopped (served).
		if t, ok := pt.(*smTimer); ok {
			sw.patience = t
			m.roles[t] = sw
		}
	} else {
		t, ok := pt.(*smTimer)
		if !ok {
			m.fail("w%d waits for a busy backend of %s with no patience timer", sw.id, D.ws)
		}
		at, active := t.state()
		dt := time.Duration(m.dialTime)
		if d := at.Sub(now); !active || d != dt && d != 2*dt {
			m.fail("w%d: patience armed for %s (active %v); the dial time is %s", sw.id, d, active, dt)
		}
		sw.patience = t
		m.roles[t] = sw
		m.armed = sw // check tells which of the two once it knows the room
		sw.patienceFor = at.Sub(now)
	}
	go func() {
		be, tok, err := m.b.await(sw.ctx, sw.caller, w)
		m.results <- smResult{id: sw.id, be: be, tok: tok, err: err}
	}()
	return sw
}

func (m *stateMachine) openSocket(tk *smToken, mb *smBackend) *smSocket {
	s := &smSocket{tok: tk, be: mb}
	tk.sockets = append(tk.sockets, s)
	m.b.socketOpened(tk.tok, &trackedConn{})
	return s
}

func (m *stateMachine) startDrain(s *smSocket) {
	s.draining = true
	m.draining = append(m.draining, s)
	m.b.drainStarted()
}

func (m *stateMachine) dialOK(tk *smToken, arg int) {
	D := tk.db
	took := smDialTimes[arg>>3&7]
	nb := &backend{}
	mb := &smBackend{id: m.newID(), db: D, be: nb, tok: tk, state: smBusy}
	m.subf("%s: dial succeeds in %s: backend %d", D.ws, took, mb.id)(func() {
		if arg&0x40 != 0 { // a first socket failed (a TLS fallback): pgx closed it
			m.startDrain(m.openSocket(tk, nil))
		}
		mb.sock = m.openSocket(tk, mb)
		m.io.set(m.io.sockOpen, nb, true)
		m.backends[nb] = mb
		m.alive = append(m.alive, mb)
		m.dialTime = smEWMA(m.dialTime, took, dialTimeAlpha)
		m.paceDialed(tk, took)
		tk.dialing, tk.be = false, mb
		now := m.clk.Now()
		mb.created, mb.checkedOut = now, now
		if m.closed {
			m.exp.busy, m.exp.busyReason = mb, reasonDriverClosed
		}
		got := m.b.dialed(tk.tok, nb, took)
		switch {
		case m.closed && got != nil:
			m.fail("dialed after Close returned the backend")
		case m.closed:
			m.followups = append(m.followups, func() { m.closeHandle(D) })
		case got != nb:
			m.fail("dialed returned another backend")
		}
	})
}

func (m *stateMachine) dialFail(tk *smToken, arg int) {
	D := tk.db
	kind := dialErrorKind(arg >> 2 & 1)
	m.subf("%s: dial fails (kind %d, %d sockets)", D.ws, kind, arg%3)(func() {
		for i := 0; i < arg%3; i++ {
			m.startDrain(m.openSocket(tk, nil))
		}
		tk.dialing, tk.closing, tk.ended = false, true, true
		if kind != dialRejected {
			m.dialErrors[kind]++
		}
		m.exp.grow = []*smDB{D}
		m.cov.dialFailures++
		m.b.dialFailed(tk.tok, kind, errSMDial)
	})
	m.followups = append(m.followups, func() { m.closeHandle(D) })
}

// reject: the server refused a dial for lack of slots; the dial closes the
// least recently used idle backend and tries again later.
func (m *stateMachine) reject(tk *smToken) {
	m.subf("%s: the server refuses a dial", tk.db.ws)(func() {
		m.startDrain(m.openSocket(tk, nil))
		m.dialErrors[dialRejected]++
		m.b.countRejection()
		v := m.victim()
		if v != nil {
			m.exp.idle[v] = reasonServerFull
		}
		gone := m.b.relieveServer(tk.tok.db)
		if (gone == nil) != (v == nil) {
			m.fail("relieveServer returned %v; the model's victim is %v", gone, v)
		}
		if v != nil {
			v.tok.gone = gone
			m.cov.rejections++
		}
	})
}

func (m *stateMachine) checkin(mb *smBackend) {
	D := mb.db
	m.subf("%s: check-in of backend %d", D.ws, mb.id)(func() {
		now := m.clk.Now()
		D.useTime = smEWMA(D.useTime, now.Sub(mb.checkedOut), useTimeAlpha)
		m.exp.busy = mb
		m.exp.grow = []*smDB{D}
		switch {
		case mb.broken:
			m.exp.busyReason = reasonBroken
		case m.closed:
			m.exp.busyReason = reasonDriverClosed
		case m.cfg.ConnMaxLifetime > 0 && now.Sub(mb.created) >= m.cfg.ConnMaxLifetime:
			m.exp.busyReason = reasonLifetime
		case D.closed:
			m.exp.busyReason = reasonUnused
		case m.overLimit(D):
			m.exp.busyReason = reasonBudgetShrink
		}
		if m.exp.busyReason == reasonNone && m.live(D) > D.reserved && m.preInFlight < m.slots() {
			for _, sw := range m.preQueue {
				if now.Sub(sw.since) < m.handoffAfter {
					break
				}
				// Only a caller of a database without a backend starves.
				if !sw.preClaim && sw.db != D && m.live(sw.db) == 0 {
					m.exp.busyReason = reasonHandoff
					m.cov.starving++
					break
				}
			}
		}
		if ws := m.waitersOf(D); m.exp.busyReason == reasonNone && len(ws) > 0 {
			m.exp.handoffTo = ws[0]
			m.reused(D)
			mb.checkedOut = now
			m.handoffs++
			m.cov.handoffs++
		} else if m.exp.busyReason == reasonNone {
			mb.state, mb.idleSince, mb.idleSeq = smIdle, now, m.seq
			D.touch = m.seq
		}
		m.b.checkin(mb.be)
	})
	m.followups = append(m.followups, func() { m.closeHandle(D) })
}

func (m *stateMachine) breakBackend(mb *smBackend, sockClosed bool) {
	m.subf("%s: backend %d breaks (socket closed %v)", mb.db.ws, mb.id, sockClosed)(func() {
		mb.broken = true
		m.io.set(m.io.broke, mb.be, true)
		if sockClosed && mb.sock != nil && !mb.sock.draining {
			m.io.set(m.io.sockOpen, mb.be, false)
			m.startDrain(mb.sock)
		}
	})
}

func (m *stateMachine) drain(s *smSocket) {
	tk := s.tok
	m.subf("%s: a socket's drain ends", tk.db.ws)(func() {
		for i, x := range m.draining {
			if x == s {
				m.draining = append(m.draining[:i], m.draining[i+1:]...)
				break
			}
		}
		for i, x := range tk.sockets {
			if x == s {
				tk.sockets = append(tk.sockets[:i], tk.sockets[i+1:]...)
				break
			}
		}
		if s.be != nil {
			s.be.sock = nil
		}
		if tk.ended && len(tk.sockets) == 0 {
			m.exp.grow = []*smDB{tk.db}
		}
		m.cov.drains++
		m.b.socketDrained(tk.tok)
	})
}

// giveUp ends a waiter's wait: its acquire timeout, or its caller's
// cancellation.
func (m *stateMachine) giveUp(sw *smWaiter, timeout bool) {
	D := sw.db
	var be *BudgetError
	var open, dbOpen, waiting int
	m.subf("%s: w%d gives up (timeout %v)", D.ws, sw.id, timeout)(func() {
		now := m.clk.Now()
		if timeout {
			sw.ctx.end(context.DeadlineExceeded)
			m.timeouts++
			m.cov.timeouts++
		} else {
			sw.caller.end(context.Canceled)
			sw.ctx.end(context.Canceled)
		}
		m.exp.grow = []*smDB{D}
		r := m.receive()
		if r.id != sw.id {
			m.fail("w%d returned while w%d gave up", r.id, sw.id)
		}
		m.exhausted++
		D.owe(now.Sub(sw.since))
		if !errors.As(r.err, &be) || !errors.Is(r.err, ErrBudgetExhausted) || r.be != nil || r.tok != nil {
			m.fail("w%d gave up: got %v", sw.id, r.err)
		}
		m.dropWaiter(sw)
		wantErr := error(context.Canceled)
		if timeout {
			wantErr = nil
		}
		if be.Workspace != D.ws || be.Database != "db"+D.ws || be.Waited != now.Sub(sw.since) || be.Err != wantErr ||
			be.Limit != m.limit() || be.DatabaseCap != m.capOf(D) {
			m.fail("w%d: %+v; the model: waited %s, limit %d, cap %d", sw.id, *be, now.Sub(sw.since), m.limit(), m.capOf(D))
		}
		open, dbOpen, waiting = m.openTotal(), m.counts(D).open, len(m.waiters)
	})
	// The numbers are those of when the wait ended: before, or after, the
	// database's other callers were reconsidered for a dial.
	if be.Open != open && be.Open != m.openTotal() || be.DatabaseOpen != dbOpen && be.DatabaseOpen != m.counts(D).open ||
		be.Waiting != waiting && be.Waiting != len(m.waiters) {
		m.fail("w%d: %+v; the model: open %d/%d, %d/%d for %s, %d waiting (or after the waiter left: %d, %d, %d)",
			sw.id, *be, open, m.limit(), dbOpen, m.capOf(D), D.ws, waiting, m.openTotal(), m.counts(D).open, len(m.waiters))
	}
	m.followups = append(m.followups, func() { m.closeHandle(D) })
}

// fire makes timer t's time come; a late callback (deferred) runs at a
// later event, as a timer's goroutine may.
func (m *stateMachine) fire(t *smTimer, deferred bool) {
	m.clk.expire(t)
	if deferred {
		m.logf("a timer fires; its callback is late")
		m.pending = append(m.pending, t)
		return
	}
	m.runTimer(t)
}

func (m *stateMachine) runTimer(t *smTimer) {
	if sw, ok := m.roles[t].(*smWaiter); ok && m.byW[sw.w] != sw {
		defer m.dropTimer(t) // its waiter is gone: nothing can arm it again
	}
	switch role := m.roles[t].(type) {
	case smReaper:
		m.sub("the reaper runs", func() {
			now := m.clk.Now()
			for _, mb := range m.alive {
				if mb.state == smIdle && !m.expiry(mb).After(now) {
					reason := reasonIdleTimeout
					if l := m.cfg.ConnMaxLifetime; l > 0 && now.Sub(mb.created) >= l {
						reason = reasonLifetime
					}
					m.exp.idle[mb] = reason
					m.cov.reaps++
				}
			}
			t.f()
		})
	case *smWaiter:
		sw := role
		m.subf("%s: w%d's patience runs out", sw.db.ws, sw.id)(func() {
			m.exp.patience = sw
			b := m.b
			b.mu.Lock()
			waiting := !sw.w.done && !sw.w.seekingLocked()
			want := waiting && sw.db.d != nil && m.live(sw.db)+sw.db.d.seeking < m.capOf(sw.db)
			b.mu.Unlock()
			t.f()
			b.mu.Lock()
			seeks := waiting && (sw.w.seekingLocked() || sw.w.done)
			b.mu.Unlock()
			if seeks != want {
				m.fail("w%d: impatient made it seek %v; the model %v", sw.id, seeks, want)
			}
			if want {
				m.cov.patience++
			}
		})
	default:
		m.fail("a timer with no known role fired")
	}
}

// advance moves the clock by d, firing on the way every timer that comes
// due, each at its time.
func (m *stateMachine) advance(d time.Duration) {
	target := m.clk.Now().Add(d)
	for i := 0; ; i++ {
		t := m.clk.earliest()
		if t == nil || t.at.After(target) {
			break
		}
		if i > 1000 {
			m.fail("timers keep firing: the clock does not get to %s", target.Sub(smEpoch))
		}
		m.fire(t, false)
	}
	m.clk.set(target)
}

func (m *stateMachine) reconfigure(arg int) {
	limit := 1 + arg%5
	cfg := smConfig(limit, 1+(arg>>3)%3, smIdleTimeouts[arg>>5&3], smLifetimes[(arg>>3^arg>>6)&3])
	m.subf("reconfigure: limit %d perDB %d idle %s life %s", limit, cfg.MaxConnectionsPerDB, cfg.ConnMaxIdleTime, cfg.ConnMaxLifetime)(func() {
		if limit < m.reservedSum() {
			var ce *ConfigError
			if err := m.b.reconfigure(cfg); !errors.As(err, &ce) {
				m.fail("reconfigure below the reservations: %v", err)
			}
			return
		}
		if limit < m.limit() {
			m.lowered = true
		}
		m.cfg = cfg
		m.exp.idle = m.simShrink()
		for _, D := range m.dbs {
			if D.d != nil {
				m.exp.grow = append(m.exp.grow, D)
			}
		}
		m.cov.reconfigures++
		if err := m.b.reconfigure(cfg); err != nil {
			m.fail("reconfigure: %v", err)
		}
	})
}

// closeDriver runs Close in a goroutine, as it waits for the drains the
// test ends later, and returns once it has done what it does at once.
func (m *stateMachine) closeDriver() {
	m.sub("Close", func() {
		for _, mb := range m.alive {
			if mb.state == smIdle {
				m.exp.idle[mb] = reasonDriverClosed
			}
		}
		m.closed = true
		m.closeDone = make(chan struct{})
		go func() {
			m.b.close()
			close(m.closeDone)
		}()
		b := m.b
		for {
			b.mu.Lock()
			started := b.closed && b.jobs == 0
			b.mu.Unlock()
			if started {
				break
			}
			runtime.Gosched()
		}
	})
}

// finish serves every caller that can be served, then ends everything and
// checks that every token came back and every database state was dropped.
func (m *stateMachine) finish() {
	for i := 0; ; i++ {
		if i > 10000 {
			m.fail("no quiescence")
		}
		m.runFollowups()
		if len(m.pending) > 0 {
			t := m.pending[0]
			m.pending = m.pending[1:]
			m.runTimer(t)
		} else if toks := m.dialingTokens(); len(toks) > 0 {
			m.dialOK(toks[0], 0)
		} else if busy := m.busyBackends(); len(busy) > 0 {
			m.checkin(busy[0])
		} else if len(m.draining) > 0 {
			m.drain(m.draining[0])
		} else if t := m.clk.earliest(); t != nil && len(m.waiters) > 0 {
			m.fire(t, false)
		} else {
			break
		}
	}
	// Whoever still waits can never be served: no token is free for it
	// and none can be freed.
	for _, sw := range m.waiters {
		if m.room(sw.db) || m.victimFor(sw.db) != nil {
			m.fail("w%d of %s still waits with nothing else going on", sw.id, sw.db.ws)
		}
	}
	for len(m.waiters) > 0 {
		m.giveUp(m.waiters[0], true)
		m.runFollowups()
	}
	for _, D := range m.dbs {
		for D.regs > 0 {
			m.closeDB(D)
		}
	}
	if !m.closed {
		m.closeDriver()
	}
	m.runFollowups()
	for len(m.draining) > 0 {
		m.drain(m.draining[0])
	}
	for len(m.pending) > 0 {
		t := m.pending[0]
		m.pending = m.pending[1:]
		m.runTimer(t)
	}
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	m.locked = true
	if b.open != 0 || len(b.dbs) != 0 || len(b.servers) != 0 || b.waiting != 0 {
		m.fail("after everything closed: open %d, %d database states, %d servers, waiting %d",
			b.open, len(b.dbs), len(b.servers), b.waiting)
	}
	for _, t := range m.clk.all() {
		if _, active := t.state(); active {
			m.fail("a timer still armed after Close")
		}
	}
}

// FuzzBudgetStateMachine runs random event sequences against the budget.
// Its seed corpus (below, and testdata/fuzz) runs with every `go test`; run
// it longer with
//
//	go test -short -run '^$' -fuzz FuzzBudgetStateMachine -fuzztime 2m .
func FuzzBudgetStateMachine(f *testing.F) {
	// Short seeds: the fuzzer lengthens what it finds interesting, and
	// minimizing long inputs would take its time. The long ones run in
	// TestBudgetStateMachineCoverage.
	for _, seq := range smSeeds(16, 20, 150) {
		f.Add(seq)
	}
	f.Fuzz(func(t *testing.T, data []byte) { runStateMachine(t, data, nil) })
}

// smSeeds returns n random inputs of between min and max events.
func smSeeds(n, min, max int) [][]byte {
	r := rand.New(rand.NewSource(int64(max)))
	seqs := make([][]byte, n)
	for i := range seqs {
		seqs[i] = make([]byte, 4+2*(min+r.Intn(max-min)))
		r.Read(seqs[i])
	}
	return seqs
}

// TestBudgetStateMachineCoverage runs the fuzz seeds and checks that they
// reach the interesting states at all.
func TestBudgetStateMachineCoverage(t *testing.T) {
	var cov smCov
	for _, seq := range smSeeds(64, 100, 1000) {
		runStateMachine(t, seq, &cov)
	}
	t.Logf("%+v", cov)
	require.Greater(t, cov.evictions, 100, "LRU evictions")
	require.Greater(t, cov.lruCompared, 10, "evictions compared with an idle backend of another database kept")
	require.Greater(t, cov.waits, 1000, "callers queued")
	require.Greater(t, cov.handoffs, 300, "hand-offs at check-in")
	require.Greater(t, cov.growth, 100, "dials for a database's second backend")
	require.Greater(t, cov.patience, 50, "patience timers that made a waiter dial")
	require.Greater(t, cov.reconfigures, 100, "reconfigures")
	require.Greater(t, cov.demotions, 5, "demotions from the protected segment")
	require.Greater(t, cov.drains, 1000, "socket drains")
	require.Greater(t, cov.starving, 20, "backends closed for a starving caller of another database")
	require.Greater(t, cov.reaps, 50, "backends reaped")
	require.Greater(t, cov.rejections, 5, "backends closed for a server that refused a dial")
	require.Greater(t, cov.shrinks, 30, "backends closed for a lowered limit")
	require.Greater(t, cov.discards, 30, "backends found dead at checkout")
	require.Greater(t, cov.timeouts, 100, "waits ended by the acquire timeout")
	require.Greater(t, cov.closes, 2, "Close during a run")
	require.Greater(t, cov.spareTaken, 0, "spare backends evicted for a growing database")
	require.Greater(t, cov.growthHeld, 20, "growing databases waiting while only a last backend was idle")
}
