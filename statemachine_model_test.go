package tenantpg

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"
)

// The model.

type smDB struct {
	i        int
	ws       string
	d        *backendPool // its pool; nil while the budget has forgotten it
	regs     int          // its connector, while open (0 or 1)
	closed   bool         // its connector was closed: check-ins close backends
	handles  int          // checkouts under way: waiting, dialing or holding a backend
	awaiting int          // waiters whose await has not returned: each holds a ref
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
	// The circuit: trips, probes started, probes failed (backoff) and
	// succeeded (reset), waits ended with a ServerDownError, and checkouts
	// served from an idle backend while the server was down.
	trips, probes, probeFailed, probeOK, downFails, downHits int
	probeHandover                                            int // the probe's caller left the dial queue still waiting
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
	early     []smResult // results received before settle looked for them
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
	circ                                            smCircuit
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
		sv.ledger.limit, sv.ledger.reserved, sv.ledger.sharedInUse, sv.ledger.sharedLive, sv.ledger.open, sv.ledger.dialing, sv.ledger.inUse, sv.ledger.idle, sv.ledger.closing, b.waiting, sv.queue.len, b.closed,
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
			d.tokens.open, d.tokens.dialing, d.tokens.inUse, d.tokens.idle, d.tokens.closing, d.waiters.len, d.waiters.seeking, d.refs, d.lru.listed, d.protected, d.growth.useTime.duration())
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
