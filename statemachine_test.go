package tenantpg

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The state-machine test drives the budget directly, without a server, with
// random sequences of the events the handles, the network and the timers
// produce, and checks it after every event against a model: which tokens are
// held and why, which backends exist and in which state, who waits in which
// order, which database each eviction must pick (SLRU), whether the server
// is down and who probes it, which timers must be armed, what every caller
// gets back, and the counters.
//
// Everything that runs is the test's: the clock is manual and the test fires
// the timers the budget armed (only those, and only when armed), sockets are
// drained when the test says so, and the goroutine of each waiter (blocked in
// await) is waited for through a channel. So every event runs to completion
// before the next, and an input replays the same way every time.
//
// The fakes are in statemachine_fakes_test.go, the model's state and
// arithmetic in statemachine_model_test.go, the events in
// statemachine_events_test.go, the checks after each of them in
// statemachine_check_test.go, and the server's circuit (outages and
// probes) in statemachine_circuit_test.go.

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
		sw.preSeeking, sw.preClaim, sw.granted = sw.w.seeking(), sw.w.claim != nil, false
	}
	m.preOpen, m.preShared, m.preReserved = b.open, sv.ledger.sharedInUse, m.reservedSum()
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
	for _, r := range m.early {
		got[r.id] = r
	}
	m.early = nil
	for len(got) < len(done) {
		r := m.receive()
		got[r.id] = r
	}
	for id := range got {
		served := false
		for _, sw := range done {
			served = served || sw.id == id
		}
		if !served {
			m.fail("w%d returned though the budget did not serve it", id)
		}
	}
	grants := map[*smDB]int{}
	for _, sw := range done {
		r, ok := got[sw.id]
		if !ok {
			m.fail("waiter w%d is done but another waiter returned", sw.id)
		}
		probe := r.tok != nil && r.err == nil && m.probeGranted(sw, r.tok)
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
			if m.circ.prober == sw {
				// Served without a dial: the next probe may start at once.
				m.circ.prober = nil
				m.logf("the probe's caller needs no dial")
			}
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
			if probe {
				m.circ.probeTok = sw.tok
			}
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
	require.Greater(t, cov.trips, 30, "circuit trips")
	require.Greater(t, cov.probes, 30, "probes started")
	require.Greater(t, cov.probeFailed, 3, "probes failed: backoff")
	require.Greater(t, cov.probeOK, 20, "probes succeeded: reset")
	require.Greater(t, cov.downFails, 30, "waits ended with a ServerDownError")
	require.Greater(t, cov.downHits, 5, "idle backends served while the server was down")
}
