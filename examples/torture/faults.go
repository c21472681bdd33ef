package main

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// faultKind is one fault of the rotation; faultQuiet is the time between.
type faultKind int

const (
	faultQuiet faultKind = iota
	faultKill
	faultRestart
	faultLimit
	faultHung
	faultStorm
	faultMisuse
	numFaults
)

var faultNames = [numFaults]string{"quiet", "kill", "restart", "limit", "hung", "storm", "misuse"}

func allFaults() []faultKind {
	var all []faultKind
	for f := faultQuiet + 1; f < numFaults; f++ {
		all = append(all, f)
	}
	return all
}

func faultList(fs []faultKind) string {
	names := make([]string, len(fs))
	for i, f := range fs {
		names[i] = faultNames[f]
	}
	return strings.Join(names, ",")
}

func parseFaults(s string) ([]faultKind, error) {
	var fs []faultKind
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		if name == "all" {
			fs = append(fs, allFaults()...)
			continue
		}
		found := false
		for f := faultQuiet + 1; f < numFaults; f++ {
			if faultNames[f] == name {
				fs = append(fs, f)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown fault %q (want some of %s)", name, faultList(allFaults()))
		}
	}
	if len(fs) == 0 {
		return nil, fmt.Errorf("-faults names no fault")
	}
	return fs, nil
}

func without(fs []faultKind, drop faultKind) []faultKind {
	var out []faultKind
	for _, f := range fs {
		if f != drop {
			out = append(out, f)
		}
	}
	return out
}

// notes records what the faults did, for the table.
type notes struct {
	injected     [numFaults]atomic.Int64
	killed       atomic.Int64 // backends terminated
	hungAccepted atomic.Int64 // connections the hung listener accepted
	slowDials    atomic.Int64 // connections through the slow proxy while it delayed
	stormCallers atomic.Int64
	pinned       atomic.Int64 // connections pinned to fill the budget for the storm
	closedDBs    atomic.Int64 // *sql.DBs closed under running queries
	shrinks      atomic.Int64 // Configure to a tiny budget and back

	mu           sync.Mutex
	rejectedIn   [numFaults]uint64 // 53300 refusals by the phase they happened in
	rejectedSeen uint64
	restarts     []time.Duration
	harness      []string // the harness's own failures (admin queries), not the driver's
	fatal        error
}

func (n *notes) harnessError(what string, err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.harness) < 10 {
		n.harness = append(n.harness, what+": "+err.Error())
	}
}

// sleepCtx sleeps for d or until ctx ends, and reports whether it slept the
// whole time.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func sleepUntil(ctx context.Context, t time.Time) bool { return sleepCtx(ctx, time.Until(t)) }

// schedule returns the lengths of a fault's active window, of the quiet
// time before the next one, given -fault-every and -recovery: 40% active,
// the recovery margin, and the rest (at least a quarter) quiet, so that
// every cycle shows whether the driver came back to error-free service.
func (o options) schedule() (active, quiet time.Duration) {
	active = o.faultEvery * 4 / 10
	quiet = max(o.faultEvery-active-o.recovery, o.faultEvery/4)
	return active, quiet
}

// faults injects the faults in rotation until ctx ends. Each fault restores
// what it changed before it returns, even when ctx ends early.
func (s *soak) faults(ctx context.Context) {
	active, quiet := s.o.schedule()
	r := rand.New(rand.NewPCG(s.o.seed, 1<<40))
	for i := 0; ; i++ {
		if !sleepCtx(ctx, quiet) {
			return
		}
		f := s.o.faults[i%len(s.o.faults)]
		s.enter(phase{fault: f})
		s.notes.injected[f].Add(1)
		end := time.Now().Add(active)
		switch f {
		case faultKill:
			s.kill(ctx, end, r)
		case faultRestart:
			s.restart(ctx, end)
		case faultLimit:
			s.limit(ctx, end)
		case faultHung:
			s.hungDials(ctx, end)
		case faultStorm:
			s.storm(ctx, end, r)
		case faultMisuse:
			s.misuse(ctx, end, r)
		}
		s.enter(phase{fault: f, recovering: true})
		ok := sleepCtx(ctx, s.o.recovery)
		s.enter(phase{fault: faultQuiet})
		if !ok {
			return
		}
		if s.o.rotations > 0 && i+1 == s.o.rotations*len(s.o.faults) {
			// One more quiet period shows that the last fault was
			// recovered from, then the run ends.
			sleepCtx(ctx, quiet)
			s.stopTraffic()
			return
		}
	}
}

// enter starts phase p, and charges the dials the server refused for lack
// of slots (53300) since the last change to the phase that just ended. The
// driver retries those, so callers rarely see them; outside the limit fault
// they mean the server counted the role at its limit while the driver had a
// token free.
func (s *soak) enter(p phase) {
	s.chargeRejections()
	s.phases.enter(p)
}

func (s *soak) chargeRejections() {
	n := s.drv.Stats().DialErrors["rejected"]
	s.notes.mu.Lock()
	defer s.notes.mu.Unlock()
	s.notes.rejectedIn[s.phases.current().fault] += n - s.notes.rejectedSeen
	s.notes.rejectedSeen = n
}

// adminExec runs a statement as the superuser, retrying for a while: right
// after a restart the admin pool may still hold a connection to the old
// server.
func (s *soak) adminExec(q string, args ...any) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := s.w.srv.Admin().ExecContext(ctx, q, args...)
		cancel()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// fatal ends the run: the harness could not restore the server, so what
// follows would measure the harness, not the driver.
func (s *soak) fatal(err error) {
	s.notes.mu.Lock()
	if s.notes.fatal == nil {
		s.notes.fatal = err
	}
	s.notes.mu.Unlock()
	s.stopTraffic()
}

// kill terminates one to three random backends of the app role every 80ms
// until end, while the workers run.
func (s *soak) kill(ctx context.Context, end time.Time, r *rand.Rand) {
	const q = `SELECT count(pg_terminate_backend(pid)) FROM (
		SELECT pid FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'
		ORDER BY random() LIMIT $2) victims`
	for {
		var n int64
		qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := s.w.srv.Admin().QueryRowContext(qctx, q, s.w.role, 1+r.IntN(3)).Scan(&n)
		cancel()
		if err != nil {
			s.notes.harnessError("kill", err)
		}
		s.notes.killed.Add(n)
		next := time.Now().Add(80 * time.Millisecond)
		if !next.Before(end) || !sleepUntil(ctx, next) {
			return
		}
	}
}

// restart stops the server (fast shutdown: every backend is terminated) and
// starts it again on the same port, as an operator would, then leaves the
// traffic to meet the new server and the dead connections of the old one
// for the rest of the window.
func (s *soak) restart(ctx context.Context, end time.Time) {
	start := time.Now()
	err := s.w.srv.Restart()
	s.notes.mu.Lock()
	s.notes.restarts = append(s.notes.restarts, time.Since(start))
	s.notes.mu.Unlock()
	if err != nil {
		s.fatal(fmt.Errorf("restart: %w", err))
		return
	}
	sleepUntil(ctx, end)
}

// limit lowers the role's CONNECTION LIMIT to half the budget until end:
// the server refuses dials beyond it with 53300 although the budget has
// tokens, and the driver must back off and free idle connections rather
// than loop or keep tokens for refused dials.
func (s *soak) limit(ctx context.Context, end time.Time) {
	role := pgtest.QuoteIdent(s.w.role)
	if err := s.adminExec(fmt.Sprintf("ALTER ROLE %s CONNECTION LIMIT %d", role, max(1, s.o.budget/2))); err != nil {
		s.notes.harnessError("lower the connection limit", err)
		return
	}
	sleepUntil(ctx, end)
	if err := s.adminExec(fmt.Sprintf("ALTER ROLE %s CONNECTION LIMIT %d", role, s.o.budget)); err != nil {
		s.fatal(fmt.Errorf("restore the connection limit: %w", err))
	}
}

// hungDials makes dials slow for the workspaces behind the proxy and sends
// callers with short deadlines to the workspaces whose host never answers
// or refuses. The hung dials hold a token each until their deadline and
// then until the driver gives up draining the socket; the rest of the
// traffic must carry on meanwhile.
func (s *soak) hungDials(ctx context.Context, end time.Time) {
	const slow = 300 * time.Millisecond
	before := s.proxy.proxied.Load()
	s.proxy.setDelay(slow)
	defer func() {
		s.proxy.setDelay(0)
		s.notes.slowDials.Add(s.proxy.proxied.Load() - before)
	}()
	accepted := s.hung.accepted.Load()
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for n := g; time.Now().Before(end) && ctx.Err() == nil; n++ {
				h := s.stuck[n%len(s.stuck)]
				_ = s.do("ping", h, h.db.PingContext, 500*time.Millisecond)
				// A refused dial fails at once: without a pause this would
				// spin on the refusing port.
				sleepCtx(ctx, 20*time.Millisecond)
			}
		}(g)
	}
	wg.Wait()
	s.notes.hungAccepted.Add(s.hung.accepted.Load() - accepted)
}

// storm pins half the budget on random workspaces, so that with the
// workers' traffic the budget is full, and sends bursts of -storm callers
// with deadlines of 1 to 20ms, a third of them cancelled at a random moment
// instead, until end. Their only acceptable errors are their own deadline or
// cancellation, or budget exhaustion that says so.
func (s *soak) storm(ctx context.Context, end time.Time, r *rand.Rand) {
	var pins []*sql.Conn
	defer func() {
		for _, c := range pins {
			c.Close()
		}
	}()
	for i := 0; i < s.o.budget/2; i++ {
		h := s.handles[r.IntN(len(s.handles))].Load()
		var c *sql.Conn
		err := s.do("pin", h, func(ctx context.Context) error {
			var err error
			if c, err = h.db.Conn(ctx); err != nil {
				return err
			}
			return c.PingContext(ctx)
		}, s.o.opTimeout)
		if c != nil {
			pins = append(pins, c)
		}
		if err == nil {
			s.notes.pinned.Add(1)
		}
	}
	for first := true; first || (time.Now().Before(end) && ctx.Err() == nil); first = false {
		var wg sync.WaitGroup
		for j := 0; j < s.o.storm; j++ {
			h := s.handles[r.IntN(len(s.handles))].Load()
			timeout := time.Duration(1+r.IntN(20)) * time.Millisecond
			cancelAfter := time.Duration(-1)
			if j%3 == 0 {
				cancelAfter = time.Duration(r.IntN(5000)) * time.Microsecond
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.do("storm", h, func(ctx context.Context) error {
					if cancelAfter >= 0 {
						var cancel context.CancelFunc
						ctx, cancel = context.WithCancel(ctx)
						defer cancel()
						t := time.AfterFunc(cancelAfter, cancel)
						defer t.Stop()
					}
					var one int
					return h.db.QueryRowContext(ctx, "SELECT 1").Scan(&one)
				}, timeout)
			}()
		}
		wg.Wait()
		s.notes.stormCallers.Add(int64(s.o.storm))
	}
}

// misuse does what applications get wrong: it holds a *sql.Conn for the
// whole window, closes a hot workspace's *sql.DB while queries run on it
// (and opens a new one in its place, as a workspace manager would), and
// shrinks the budget to 2 under load and restores it.
func (s *soak) misuse(ctx context.Context, end time.Time, r *rand.Rand) {
	start := time.Now()
	window := end.Sub(start)

	// Not one of the hot workspaces, one of which is closed below.
	h := s.handles[3+r.IntN(len(s.handles)-3)].Load()
	var held *sql.Conn
	_ = s.do("hold", h, func(ctx context.Context) error {
		var err error
		if held, err = h.db.Conn(ctx); err != nil {
			return err
		}
		return held.PingContext(ctx)
	}, s.o.opTimeout)
	defer func() {
		if held != nil {
			held.Close()
		}
	}()

	// Close a hot workspace under running queries.
	i := r.IntN(3)
	old := s.handles[i].Load()
	repl, err := s.openHandle(i)
	if err != nil {
		s.notes.harnessError("reopen a workspace", err)
	} else {
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) {
					err := s.do("closing", old, func(ctx context.Context) error {
						var v string
						return old.db.QueryRowContext(ctx, selectV, 1).Scan(&v)
					}, s.o.opTimeout)
					if err != nil && classify(err, old.class) == errClosed {
						return
					}
				}
			}()
		}
		sleepCtx(context.Background(), 30*time.Millisecond) // let them run
		s.handles[i].Store(repl)
		old.db.Close()
		wg.Wait()
		old.close()
		s.notes.closedDBs.Add(1)
	}

	// A tiny budget and back, under load, with the held connection in it.
	sleepUntil(ctx, start.Add(window/2))
	tiny := s.cfg
	tiny.MaxConnections = 2
	tiny.ServerMaxConnections = map[string]int{s.w.addr(): 1, s.proxy.addr(): 1}
	tiny.MaxConnectionsPerDB = min(tiny.MaxConnectionsPerDB, 2)
	if err := s.drv.Configure(tiny); err != nil {
		s.notes.harnessError("configure a tiny budget", err)
	} else {
		s.notes.shrinks.Add(1)
	}
	sleepUntil(ctx, start.Add(window*3/4))
	if err := s.drv.Configure(s.cfg); err != nil {
		s.fatal(fmt.Errorf("restore the budget: %w", err))
	}

	// The held connection still works after all that.
	if held != nil {
		_ = s.do("hold", h, func(ctx context.Context) error {
			var v string
			return held.QueryRowContext(ctx, selectV, 2).Scan(&v)
		}, s.o.opTimeout)
	}
	sleepUntil(ctx, end)
}
