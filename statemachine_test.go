package tenantpg

import (
	"context"
	"fmt"
	"math/rand"
	"runtime"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// checkInvariantsLocked checks the budget's bookkeeping against itself: the
// counters against the lists, the databases and the waiters. It is the
// shared invariant of the state-machine fuzz test and of every server test
// at quiescence. It returns the first violation found.
func (b *budget) checkInvariantsLocked() error {
	var open, dialing, inUse, idle, closing, shared, live, reserved, waiting, idleDBs, busy, protectedOpen int
	for k, d := range b.dbs {
		if d.key != k {
			return fmt.Errorf("database %q filed under another key", d.workspace)
		}
		if d.open != d.dialing+d.inUse+d.idle+d.closing {
			return fmt.Errorf("database %q: open %d != dialing %d + inUse %d + idle %d + closing %d",
				d.workspace, d.open, d.dialing, d.inUse, d.idle, d.closing)
		}
		if d.open < 0 || d.dialing < 0 || d.inUse < 0 || d.idle < 0 || d.closing < 0 || d.waiting < 0 || d.refs < 0 {
			return fmt.Errorf("database %q: a negative counter: %+v", d.workspace, *d)
		}
		if d.refs == 0 && d.open == 0 {
			return fmt.Errorf("database %q: no connector, no connection, and not forgotten", d.workspace)
		}
		if d.idle != d.idleConns.len {
			return fmt.Errorf("database %q: idle %d but %d idle conns listed", d.workspace, d.idle, d.idleConns.len)
		}
		if (d.idle > 0) != d.lru.listed {
			return fmt.Errorf("database %q: idle %d, in the recency list %v", d.workspace, d.idle, d.lru.listed)
		}
		for c := d.idleConns.front; c != nil; c = d.idleConns.next(c) {
			if c.state.Load() != stateIdle || c.db != d {
				return fmt.Errorf("database %q: a conn in state %d in its idle list", d.workspace, c.state.Load())
			}
		}
		for c := d.busy.front; c != nil; c = d.busy.next(c) {
			if c.state.Load() != stateBusy || c.db != d {
				return fmt.Errorf("database %q: a conn in state %d in its busy list", d.workspace, c.state.Load())
			}
			if n := d.busy.next(c); n != nil && n.checkedOut.Before(c.checkedOut) {
				return fmt.Errorf("database %q: busy list out of checkout order", d.workspace)
			}
		}
		open += d.open
		dialing += d.dialing
		inUse += d.inUse
		idle += d.idle
		closing += d.closing
		shared += max(0, d.open-d.reserved)
		live += liveShared(d)
		reserved += d.reserved
		waiting += d.waiting
		busy += d.busy.len
		if d.lru.listed {
			idleDBs++
		}
		if d.protected {
			protectedOpen += d.open
			if d.open == 0 {
				return fmt.Errorf("database %q protected without a connection", d.workspace)
			}
		}
	}
	switch {
	case open != b.open || dialing != b.dialing || inUse != b.inUse || idle != b.idle || closing != b.closing:
		return fmt.Errorf("budget counters (open %d dialing %d inUse %d idle %d closing %d) != sum over databases (%d %d %d %d %d)",
			b.open, b.dialing, b.inUse, b.idle, b.closing, open, dialing, inUse, idle, closing)
	case shared != b.sharedInUse:
		return fmt.Errorf("sharedInUse %d, but databases hold %d beyond their reservations", b.sharedInUse, shared)
	case live != b.sharedLive:
		return fmt.Errorf("sharedLive %d, but databases hold %d live beyond their reservations", b.sharedLive, live)
	case reserved != b.reserved:
		return fmt.Errorf("reserved %d, but databases reserve %d", b.reserved, reserved)
	case idleDBs != b.probation.len+b.protected.len:
		return fmt.Errorf("%d databases in the recency lists, %d listed as idle", b.probation.len+b.protected.len, idleDBs)
	case protectedOpen != b.protectedOpen:
		return fmt.Errorf("protectedOpen %d, but protected databases hold %d", b.protectedOpen, protectedOpen)
	case waiting != b.waiters.len:
		return fmt.Errorf("%d waiters queued, databases count %d", b.waiters.len, waiting)
	case b.peakOpen < b.open:
		return fmt.Errorf("peak %d below open %d", b.peakOpen, b.open)
	case !b.closed && inUse != busy+b.fresh.len:
		return fmt.Errorf("inUse %d, but %d busy and %d fresh conns listed", inUse, busy, b.fresh.len)
	}
	for x := b.probation.front; x != nil; x = b.probation.next(x) {
		if x.protected {
			return fmt.Errorf("protected database %q on probation", x.workspace)
		}
	}
	for x := b.protected.front; x != nil; x = b.protected.next(x) {
		if !x.protected {
			return fmt.Errorf("database %q on probation in the protected list", x.workspace)
		}
	}
	for c := b.fresh.front; c != nil; c = b.fresh.next(c) {
		if c.state.Load() != stateFresh {
			return fmt.Errorf("a conn in state %d in the fresh list", c.state.Load())
		}
	}
	for w := b.waiters.front; w != nil; w = b.waiters.next(w) {
		if w.granted {
			return fmt.Errorf("a granted waiter of %q still queued", w.db.workspace)
		}
		if w.claim != nil && w.claim.claim != w {
			return fmt.Errorf("a waiter of %q claims a token promised elsewhere", w.db.workspace)
		}
	}
	return nil
}

// The state-machine test drives the budget directly, without a server, with
// random sequences of the events database/sql and the network produce, and
// checks it after every event against a model: which connections exist and in
// which state, which tokens are held, who waits, and when each database was
// last used.

type smState uint8

const (
	smFresh smState = iota
	smBusy
	smIdle
	smDoomed
	smEvicted // the driver closed it; database/sql still holds it
	smClosed
)

type smConn struct {
	c        *conn
	st       smState
	inOp     bool
	returned int // model time of the last check-in, for the oldest-idle rule
}

type smResult struct {
	id  int
	tok *token
	err error
}

type smWaiter struct {
	id     int
	db     int
	cancel context.CancelFunc
}

type stateMachine struct {
	t            *testing.T
	b            *budget
	dbs          []*database
	conns        []*smConn
	dialing      []*token // granted tokens, not dialed yet
	drains       []*token // tokens whose socket the driver or the app closed: drain pending
	waiters      []*smWaiter
	results      chan smResult
	early        []smResult // results taken while waiting for another
	nextID       int
	clock        int         // model time, one tick per event
	touched      map[int]int // database index -> model time of its last check-in or idle checkout
	demoted      map[int]int // database index -> model time it was last demoted from protected
	wasProtected []bool
	// reconfigured marks an event that changed the limits: its evictions
	// follow the shrink's rules, not the waiters'.
	reconfigured bool
	log          []string
}

func (m *stateMachine) fail(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("%s\nafter:\n  %s\nbudget:\n%s", fmt.Sprintf(format, args...), joinTail(m.log, 40), m.dump())
}

func joinTail(lines []string, n int) string {
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	s := ""
	for i, l := range lines {
		if i > 0 {
			s += "\n  "
		}
		s += l
	}
	return s
}

// dump describes the budget; fail may be called with b.mu held or not.
func (m *stateMachine) dump() string {
	b := m.b
	if b.mu.TryLock() {
		b.mu.Unlock()
		return (&Driver{b: b}).dumpState()
	}
	return "(budget locked by the check that failed)"
}

func (m *stateMachine) dbIndex(d *database) int {
	for i, x := range m.dbs {
		if x == d {
			return i
		}
	}
	return -1
}

// runStateMachine interprets data as a setup and a sequence of events.
func runStateMachine(t *testing.T, data []byte) {
	if len(data) < 4 {
		return
	}
	limit := 1 + int(data[0]%8)
	perDB := min(1+int(data[1]%3), limit)
	nDB := 1 + int(data[2]%6)
	handoffNow := data[3]&1 == 1
	reserve := int(data[3]>>1) % 3
	if reserve > limit {
		reserve = limit
	}
	data = data[4:]

	cfg, err := Config{MaxConnections: limit, MaxConnectionsPerDB: perDB, AcquireTimeout: time.Hour,
		ConnMaxIdleTime: time.Hour, ConnMaxLifetime: time.Hour}.normalize()
	if err != nil {
		t.Fatal(err)
	}
	b := newBudget(cfg)
	// Time is the test's: the grace period is zero, and the timers the
	// budget arms are fired by the test (when armed) instead of by the
	// runtime, so that every event runs to completion before the next.
	b.grace = 0
	if !handoffNow {
		b.handoffAfter = time.Hour
	} else {
		b.handoffAfter = 0
	}
	b.reaper.fn = func() {}
	b.graceEnded.fn = func() {}

	m := &stateMachine{t: t, b: b, results: make(chan smResult, 64), touched: map[int]int{}, demoted: map[int]int{}}
	for i := 0; i < nDB; i++ {
		p := &dsnParams{cfg: &pgx.ConnConfig{}, key: dbKey{database: fmt.Sprint("db", i)}, workspace: fmt.Sprint("ws", i)}
		p.cfg.Database = p.key.database
		if i == 0 {
			p.reserved = reserve
		}
		d, err := b.register(p)
		if err != nil {
			t.Fatal(err)
		}
		m.dbs = append(m.dbs, d)
	}
	m.log = append(m.log, fmt.Sprintf("limit %d perDB %d dbs %d handoffNow %v reserve(ws0) %d", limit, perDB, nDB, handoffNow, reserve))
	m.check()

	for len(data) >= 2 {
		op, arg := data[0], int(data[1])
		data = data[2:]
		m.clock++
		m.reconfigured = false
		m.step(opWeights[op%byte(len(opWeights))], arg)
		m.noteSegments()
		m.settle()
		m.check()
	}
	m.finish()
}

// opWeights maps an event byte to an event, weighted so that sequences
// reach full budgets, idle connections in several databases and queues.
var opWeights = []byte{0, 0, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4, 5, 6, 6, 6, 7, 8, 9}

func (m *stateMachine) step(op byte, arg int) {
	b := m.b
	pick := func(n int) int { return arg % n }
	switch op {
	case 0, 1: // a caller needs a connection
		i := pick(len(m.dbs))
		if arg&0x40 == 0 {
			// database/sql does not dial for a *sql.DB at its
			// SetMaxOpenConns; only several *sql.DB of one database do.
			b.mu.Lock()
			for k := 0; k < len(m.dbs); k++ {
				if d := m.dbs[(i+k)%len(m.dbs)]; d.open+d.waiting < b.capOf(d) {
					i = (i + k) % len(m.dbs)
					break
				}
			}
			b.mu.Unlock()
		}
		m.acquire(i)
	case 2: // a dial ends
		if len(m.dialing) == 0 {
			return
		}
		i := pick(len(m.dialing))
		tok := m.dialing[i]
		m.dialing = append(m.dialing[:i], m.dialing[i+1:]...)
		b.socketOpened(tok, nil)
		if arg&0xe0 == 0xe0 { // refused or failed: the socket still has to drain
			m.log = append(m.log, fmt.Sprintf("%d dial of ws%d fails", m.clock, m.dbIndex(tok.db)))
			b.dialFailed(tok, dialErrorKind(arg>>6&1), nil)
			m.drains = append(m.drains, tok)
			return
		}
		c := &conn{db: tok.db, b: b, tok: tok, created: time.Now()}
		if !b.connected(c) {
			m.fail("connected refused on an open driver")
		}
		sc := &smConn{c: c, st: smFresh}
		m.conns = append(m.conns, sc)
		m.log = append(m.log, fmt.Sprintf("%d dial of ws%d succeeds: conn %d", m.clock, m.dbIndex(tok.db), len(m.conns)-1))
		if arg&0x10 == 0 { // usually the caller that dialed uses it at once
			if ok, _ := b.checkout(c, time.Now()); !ok {
				m.fail("first use of a new conn refused")
			}
			sc.st = smBusy
		}
	case 3: // database/sql checks a connection out
		sc := m.conn(arg, smFresh, smIdle, smEvicted)
		if sc == nil {
			return
		}
		ok, redial := b.checkout(sc.c, time.Now())
		m.log = append(m.log, fmt.Sprintf("%d checkout of conn %d (%s, state %d): ok %v redial %v", m.clock, m.indexOf(sc), sc.c.db.workspace, sc.st, ok, redial))
		switch sc.st {
		case smIdle, smFresh:
			if !ok || redial {
				m.fail("checkout of a live conn refused")
			}
			if sc.st == smIdle {
				m.touched[m.dbIndex(sc.c.db)] = m.clock
			}
			sc.st = smBusy
		case smEvicted:
			if ok {
				m.fail("checkout of an evicted conn succeeded")
			}
			// database/sql closes it (ErrBadConn), or the first use dials
			// again; either way this conn is done.
			if b.closeConn(sc.c) {
				m.fail("closing an evicted conn asked for a physical close")
			}
			sc.st = smClosed
		}
	case 4: // database/sql checks a connection in
		sc := m.conn(arg, smBusy, smFresh)
		if sc == nil {
			return
		}
		keep := b.checkin(sc.c)
		m.log = append(m.log, fmt.Sprintf("%d checkin of conn %d (%s): keep %v", m.clock, m.indexOf(sc), sc.c.db.workspace, keep))
		if keep {
			sc.st = smIdle
			sc.returned = m.clock
			m.touched[m.dbIndex(sc.c.db)] = m.clock
		} else {
			sc.st = smDoomed
		}
	case 5: // database/sql closes a connection
		sc := m.conn(arg, smFresh, smBusy, smIdle, smDoomed, smEvicted)
		if sc == nil || sc.inOp {
			return
		}
		physical := b.closeConn(sc.c)
		m.log = append(m.log, fmt.Sprintf("%d close of conn %d (%s, state %d): physical %v", m.clock, m.indexOf(sc), sc.c.db.workspace, sc.st, physical))
		if physical != (sc.st != smEvicted) {
			m.fail("close of a conn in model state %d: physical close %v", sc.st, physical)
		}
		if physical {
			m.drains = append(m.drains, sc.c.tok)
		}
		sc.st = smClosed
	case 6: // a closed socket's drain ends
		if len(m.drains) == 0 {
			return
		}
		i := pick(len(m.drains))
		tok := m.drains[i]
		m.drains = append(m.drains[:i], m.drains[i+1:]...)
		m.log = append(m.log, fmt.Sprintf("%d drain of a ws%d socket ends", m.clock, m.dbIndex(tok.db)))
		b.drainStarted()
		b.socketDrained(tok)
	case 7: // a caller gives up
		if len(m.waiters) == 0 {
			return
		}
		w := m.waiters[pick(len(m.waiters))]
		m.log = append(m.log, fmt.Sprintf("%d waiter %d (ws%d) gives up", m.clock, w.id, w.db))
		w.cancel()
		m.collect(len(m.waiters) - 1)
	case 8: // a statement is closed on an idle connection, in two steps
		for _, sc := range m.conns {
			if sc.inOp {
				b.endIdleOp(sc.c)
				sc.inOp = false
				m.log = append(m.log, fmt.Sprintf("%d idle op on conn %d ends", m.clock, m.indexOf(sc)))
				return
			}
		}
		sc := m.conn(arg, smIdle)
		if sc == nil {
			return
		}
		ok, wasIdle := b.beginIdleOp(sc.c)
		if !ok || !wasIdle {
			m.fail("idle op refused on an idle conn")
		}
		sc.inOp = true
		m.log = append(m.log, fmt.Sprintf("%d idle op on conn %d begins", m.clock, m.indexOf(sc)))
	case 9: // the application reconfigures
		m.reconfigured = true
		smCoverage.reconfigures++
		limit := max(1+arg%6, b.reserved)
		perDB := min(1+(arg>>3)%3, limit)
		cfg, err := Config{MaxConnections: limit, MaxConnectionsPerDB: perDB, AcquireTimeout: time.Hour,
			ConnMaxIdleTime: time.Hour, ConnMaxLifetime: time.Hour}.normalize()
		if err != nil {
			m.fail("%v", err)
		}
		m.log = append(m.log, fmt.Sprintf("%d reconfigure: limit %d perDB %d", m.clock, limit, cfg.MaxConnectionsPerDB))
		if err := b.reconfigure(cfg); err != nil {
			m.fail("reconfigure: %v", err)
		}
	}
}

// noteSegments records the databases the last event demoted from the
// protected segment, and checks that only a reuse protects a database.
func (m *stateMachine) noteSegments() {
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if m.wasProtected == nil {
		m.wasProtected = make([]bool, len(m.dbs))
	}
	for i, d := range m.dbs {
		switch {
		case m.wasProtected[i] && !d.protected && d.open > 0:
			m.demoted[i] = m.clock
			smCoverage.demotions++
		case !m.wasProtected[i] && d.protected && m.touched[i] != m.clock:
			m.fail("%s protected without a reuse", d.workspace)
		}
		m.wasProtected[i] = d.protected
	}
}

func (m *stateMachine) indexOf(sc *smConn) int {
	for i, x := range m.conns {
		if x == sc {
			return i
		}
	}
	return -1
}

// conn picks a connection in one of the given model states.
func (m *stateMachine) conn(arg int, states ...smState) *smConn {
	var cands []*smConn
	for _, sc := range m.conns {
		for _, st := range states {
			if sc.st == st {
				cands = append(cands, sc)
				break
			}
		}
	}
	if len(cands) == 0 {
		return nil
	}
	return cands[arg%len(cands)]
}

// acquire starts a caller for database i and returns once it holds a token
// or waits in line.
func (m *stateMachine) acquire(i int) {
	b := m.b
	ctx, cancel := context.WithCancel(context.Background())
	id := m.nextID
	m.nextID++
	before := map[*waiter]bool{}
	b.mu.Lock()
	for w := b.waiters.front; w != nil; w = b.waiters.next(w) {
		before[w] = true
	}
	b.mu.Unlock()
	go func() {
		tok, err := b.acquire(ctx, ctx, m.dbs[i])
		m.results <- smResult{id: id, tok: tok, err: err}
	}()
	for {
		select {
		case r := <-m.results:
			if r.id != id { // an older waiter the new one's arrival served
				m.early = append(m.early, r)
				continue
			}
			cancel()
			m.log = append(m.log, fmt.Sprintf("%d acquire for ws%d: served at once (err %v)", m.clock, i, r.err))
			if r.err != nil {
				m.fail("immediate acquire failed: %v", r.err)
			}
			m.dialing = append(m.dialing, r.tok)
			return
		default:
		}
		// Queued, and done closing what its arrival evicted: acquire
		// closes those in its own goroutine, after it has queued.
		b.mu.Lock()
		queued := false
		for w := b.waiters.front; w != nil; w = b.waiters.next(w) {
			queued = queued || !before[w]
		}
		busy := b.jobs > 0
		b.mu.Unlock()
		if queued && !busy {
			m.waiters = append(m.waiters, &smWaiter{id: id, db: i, cancel: cancel})
			smCoverage.waits++
			m.log = append(m.log, fmt.Sprintf("%d acquire for ws%d: waits as %d", m.clock, i, id))
			return
		}
		runtime.Gosched()
	}
}

// collect waits until only `remaining` of the model's waiters are still
// queued, taking the results of the others.
func (m *stateMachine) collect(remaining int) {
	for len(m.waiters) > remaining {
		var r smResult
		if len(m.early) > 0 {
			r, m.early = m.early[0], m.early[1:]
		} else {
			r = <-m.results
		}
		k := -1
		for j, w := range m.waiters {
			if w.id == r.id {
				k = j
			}
		}
		if k < 0 {
			m.fail("a result for unknown waiter %d", r.id)
		}
		w := m.waiters[k]
		w.cancel()
		m.waiters = append(m.waiters[:k], m.waiters[k+1:]...)
		if r.err == nil {
			m.dialing = append(m.dialing, r.tok)
			m.log = append(m.log, fmt.Sprintf("%d waiter %d (ws%d) granted", m.clock, w.id, w.db))
		} else {
			m.log = append(m.log, fmt.Sprintf("%d waiter %d (ws%d) ends: %v", m.clock, w.id, w.db, r.err))
		}
	}
}

// settle runs what the budget's timers would run once the (zero) grace
// period has passed, takes the results of waiters served meanwhile, and
// records the connections the budget evicted.
func (m *stateMachine) settle() {
	b := m.b
	b.mu.Lock()
	armed := b.graceEnded.armed
	b.mu.Unlock()
	if armed {
		b.graceExpired()
	}
	b.mu.Lock()
	queued := b.waiters.len
	b.mu.Unlock()
	m.collect(queued)

	// Evictions: only fresh and idle conns may be taken, and among idle
	// ones, those of the least recently used database first.
	var evicted []*smConn
	for _, sc := range m.conns {
		st := sc.c.state.Load()
		switch sc.st {
		case smFresh, smIdle:
			if st == stateEvicted || st == stateRedial {
				if sc.inOp {
					m.fail("conn %d evicted during an idle op", m.indexOf(sc))
				}
				evicted = append(evicted, sc)
			}
		case smBusy:
			if st != stateBusy {
				m.fail("busy conn %d changed to state %d under its caller", m.indexOf(sc), st)
			}
		case smDoomed:
			if st != stateDoomed {
				m.fail("doomed conn %d changed to state %d", m.indexOf(sc), st)
			}
		}
	}
	smCoverage.evictions += len(evicted)
	if !m.reconfigured {
		m.checkVictims(evicted) // a shrink evicts by other rules
	}
	for _, sc := range evicted {
		m.log = append(m.log, fmt.Sprintf("%d conn %d (%s) evicted", m.clock, m.indexOf(sc), sc.c.db.workspace))
		sc.st = smEvicted
		m.drains = append(m.drains, sc.c.tok)
	}
}

// checkVictims checks that evicted idle conns were chosen in segmented
// recency order (SLRU): databases on probation before protected ones, the
// least recently used first within a segment, where a database demoted from
// protected counts as used when it was demoted; within a database, the
// longest idle conn first. No conn left idle may rank before one evicted,
// unless it sits within its database's reservation, is in use by an idle
// op, or its database was evicted from because it was at its own cap.
func (m *stateMachine) checkVictims(evicted []*smConn) {
	if len(evicted) == 0 {
		return
	}
	rank := func(sc *smConn) (segment, used int) {
		i := m.dbIndex(sc.c.db)
		if sc.c.db.protected {
			return 1, m.touched[i]
		}
		return 0, max(m.touched[i], m.demoted[i])
	}
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, v := range evicted {
		if v.st != smIdle || v.c.tok.claim == nil {
			continue // only closes for a waiter follow the recency order
		}
		vd := v.c.db
		for _, sc := range m.conns {
			if sc.st != smIdle || sc.inOp || sc.c.state.Load() != stateIdle {
				continue
			}
			d := sc.c.db
			if d == vd {
				if sc.returned < v.returned {
					m.fail("conn %d of %s evicted before the longer idle conn %d", m.indexOf(v), vd.workspace, m.indexOf(sc))
				}
				continue
			}
			if d.open-d.closing <= d.reserved {
				continue // within its reservation: closing it would free no shared token
			}
			if w := v.c.tok.claim; w != nil && w.db == vd && vd.open >= b.capOf(vd) {
				continue // closed for a caller of its own database at its cap
			}
			smCoverage.lruCompared++
			vs, vu := rank(v)
			ks, ku := rank(sc)
			if ks < vs || ks == vs && ku < vu {
				m.fail("%s (segment %d, used at %d) evicted while %s (segment %d, used at %d) kept an idle conn", vd.workspace, vs, vu, d.workspace, ks, ku)
			}
		}
	}
}

// smCoverage counts what the seed corpus exercises, so that a change to the
// generator that stops reaching evictions fails a test instead of passing
// vacuously.
var smCoverage struct{ evictions, lruCompared, waits, reconfigures, demotions int }

// check compares the budget with the model after an event.
func (m *stateMachine) check() {
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.checkInvariantsLocked(); err != nil {
		m.fail("%v", err)
	}
	// Tokens: every one the model knows of is held, and no other.
	held := len(m.dialing) + len(m.drains)
	for _, sc := range m.conns {
		switch sc.st {
		case smFresh, smBusy, smIdle, smDoomed:
			held++
		}
	}
	if b.open != held {
		m.fail("budget holds %d tokens; the model counts %d", b.open, held)
	}
	if b.waiters.len != len(m.waiters) {
		m.fail("budget has %d waiters; the model %d", b.waiters.len, len(m.waiters))
	}
	// Safety: tokens are only granted within the limit. A lowered limit may
	// leave more held until busy conns return, but then nobody is served.
	if len(m.waiters) > 0 && b.open > b.limit {
		for w := b.waiters.front; w != nil; w = b.waiters.next(w) {
			if w.granted {
				m.fail("granted beyond the limit")
			}
		}
	}
	for _, sc := range m.conns {
		if sc.st == smIdle && !sc.inOp && sc.c.state.Load() == stateIdle && b.overLimitLocked(sc.c.db) {
			m.fail("%s over its limit with idle conn %d left", sc.c.db.workspace, m.indexOf(sc))
		}
	}
	// Liveness: no caller waits while a token is free for it, or while an
	// idle conn it could take is left alone.
	for w := b.waiters.front; w != nil; w = b.waiters.next(w) {
		if w.claim != nil {
			continue // promised a token being closed
		}
		d := w.db
		atCap := d.open >= b.capOf(d)
		if !atCap && b.roomLocked(d) {
			m.fail("waiter of %s left waiting with a free token", d.workspace)
		}
		for _, sc := range m.conns {
			x := sc.c.db
			if (sc.st != smIdle && sc.st != smFresh) || sc.inOp || sc.c.state.Load() == stateEvicted || sc.c.state.Load() == stateRedial {
				continue
			}
			if atCap && x == d || !atCap && x.open-x.closing > x.reserved {
				m.fail("waiter of %s left waiting while conn %d of %s could be evicted", d.workspace, m.indexOf(sc), x.workspace)
			}
		}
	}
}

// finish ends every caller and connection and checks that every token came
// back and every database state was forgotten.
func (m *stateMachine) finish() {
	b := m.b
	for _, w := range m.waiters {
		w.cancel()
	}
	m.collect(0)
	for _, tok := range m.dialing {
		b.dialFailed(tok, dialOther, nil)
	}
	m.dialing = nil
	for _, sc := range m.conns {
		if sc.inOp {
			b.endIdleOp(sc.c)
			sc.inOp = false
		}
	}
	m.settle()
	for _, sc := range m.conns {
		if sc.st != smClosed {
			if b.closeConn(sc.c) {
				m.drains = append(m.drains, sc.c.tok)
			}
			sc.st = smClosed
		}
	}
	for _, tok := range m.drains {
		b.drainStarted()
		b.socketDrained(tok)
	}
	m.drains = nil
	for _, d := range m.dbs {
		b.unregister(d)
	}
	b.close()
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.checkInvariantsLocked(); err != nil {
		m.fail("%v", err)
	}
	if b.open != 0 || len(b.dbs) != 0 || b.reserved != 0 || b.sharedInUse != 0 {
		m.fail("after everything closed: open %d, %d database states, reserved %d, shared %d", b.open, len(b.dbs), b.reserved, b.sharedInUse)
	}
}

// FuzzBudgetStateMachine runs random event sequences against the budget.
// Its seed corpus (below, and testdata/fuzz) runs with every `go test`; run
// it longer with
//
//	go test -run XXX -fuzz FuzzBudgetStateMachine -fuzztime 2m .
func FuzzBudgetStateMachine(f *testing.F) {
	for _, seq := range smSeeds() {
		f.Add(seq)
	}
	f.Fuzz(runStateMachine)
}

func smSeeds() [][]byte {
	r := rand.New(rand.NewSource(1))
	seqs := make([][]byte, 64)
	for i := range seqs {
		seqs[i] = make([]byte, 4+2*(20+r.Intn(300)))
		r.Read(seqs[i])
	}
	return seqs
}

// TestBudgetStateMachineCoverage runs the fuzz seeds and checks that they
// reach the interesting states at all.
func TestBudgetStateMachineCoverage(t *testing.T) {
	smCoverage = struct{ evictions, lruCompared, waits, reconfigures, demotions int }{}
	for _, seq := range smSeeds() {
		runStateMachine(t, seq)
	}
	t.Logf("%+v", smCoverage)
	require.Greater(t, smCoverage.evictions, 100)
	require.Greater(t, smCoverage.lruCompared, 0)
	require.Greater(t, smCoverage.waits, 100)
	require.Greater(t, smCoverage.reconfigures, 10)
	require.Greater(t, smCoverage.demotions, 0)
}
