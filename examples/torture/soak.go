package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tenantpg/tenantpg"
)

// soak is one run: the driver under test, the workspaces' handles, the fake
// servers the hung fault uses, and what was counted.
type soak struct {
	o     options
	w     *world
	cfg   tenantpg.Config
	drv   *tenantpg.Driver
	setup time.Duration // starting the server and creating the databases

	handles []atomic.Pointer[handle] // one per workspace; replaced by the misuse fault
	dsns    []string
	stuck   []*handle // the hung and refusing workspaces
	hung    *hungServer
	proxy   *slowProxy
	logs    *logWatch

	phases      *phaseLog
	tally       tally
	notes       notes
	stopTraffic context.CancelFunc

	sampledOpen atomic.Int64 // the most tokens a 5ms sampler saw
	statsHits   atomic.Int64 // stats snapshots whose JSON held the password
}

func newSoak(o options, w *world) *soak {
	return &soak{o: o, w: w, phases: newPhaseLog(), stopTraffic: func() {}}
}

// Every tenth workspace is reached through the slow proxy, the rest
// directly: the hung fault makes those dials slow, and the other faults
// reach them through the proxy just the same.
func proxied(i int) bool { return i%10 == 9 }

func (s *soak) openHandle(i int) (*handle, error) {
	db, err := s.drv.OpenDB(s.dsns[i])
	if err != nil {
		return nil, err
	}
	return &handle{label: s.w.labels[i], class: classServer, db: db}, nil
}

func (s *soak) run(ctx context.Context, out, status io.Writer, tty bool) (*report, error) {
	// Counted before anything the run starts: whatever is left above it
	// once everything is closed is a leak.
	baseline := runtime.NumGoroutine()

	var err error
	if s.hung, err = startHung(); err != nil {
		return nil, err
	}
	defer s.hung.close()
	refused, err := refusedAddr()
	if err != nil {
		return nil, err
	}
	if s.proxy, err = startProxy(s.w.addr()); err != nil {
		return nil, err
	}
	defer s.proxy.close()

	s.logs = &logWatch{secret: password}
	// The driver budgets each server as the DSNs name it, so the proxy is a
	// server of its own; together the two ways to the one real server get
	// the budget under test.
	proxyShare := max(1, s.o.budget/4)
	s.cfg = tenantpg.Config{
		MaxConnections:       s.o.budget,
		ServerMaxConnections: map[string]int{s.w.addr(): s.o.budget - proxyShare, s.proxy.addr(): proxyShare},
		MaxConnectionsPerDB:  s.o.perDB,
		AcquireTimeout:       s.o.acquireTimeout,
		Name:                 "torture",
		Logger:               slog.New(slog.NewTextHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if s.drv, err = tenantpg.NewDriver(s.cfg); err != nil {
		return nil, err
	}
	defer s.drv.Close()

	var closeOnce sync.Once
	closeHandles := func() {
		closeOnce.Do(func() {
			for i := range s.handles {
				if h := s.handles[i].Load(); h != nil {
					h.close()
				}
			}
			for _, h := range s.stuck {
				h.close()
			}
		})
	}
	defer closeHandles()
	s.dsns = make([]string, s.o.workspaces)
	s.handles = make([]atomic.Pointer[handle], s.o.workspaces)
	for i := range s.dsns {
		addr := s.w.addr()
		if proxied(i) {
			addr = s.proxy.addr()
		}
		s.dsns[i] = s.w.dsn(addr, s.w.dbs[i], s.w.labels[i])
		h, err := s.openHandle(i)
		if err != nil {
			return nil, err
		}
		s.handles[i].Store(h)
	}
	// One connection each at most, so that the hung dials hold two tokens
	// of the budget, not the per-database cap times two.
	for _, st := range []struct {
		addr, name string
		class      wsClass
	}{{s.hung.addr(), "hung_0", classHung}, {s.hung.addr(), "hung_1", classHung}, {refused, "refused_0", classRefused}} {
		db, err := s.drv.OpenDB(s.w.dsn(st.addr, st.name, st.name, "pool_max_conns=1"))
		if err != nil {
			return nil, err
		}
		s.stuck = append(s.stuck, &handle{label: st.name, class: st.class, db: db})
	}

	active, quiet := s.o.schedule()
	bound := fmt.Sprintf("%s or %d operations", s.o.duration, s.o.maxOps)
	if s.o.rotations > 0 {
		bound += fmt.Sprintf(" or %d rotations", s.o.rotations)
	}
	fmt.Fprintf(status, "torture: %d workspaces (%d through the slow proxy), %d workers, budget %d; faults %s, each %s active + %s recovery, %s quiet between; for %s\n",
		s.o.workspaces, s.o.workspaces/10, s.o.workers, s.o.budget, faultList(s.o.faults), active, s.o.recovery, quiet, bound)

	// Samplers: the server's own count of the role's backends, and the
	// driver's tokens, both more often than anything holds a connection.
	serverPeak := s.w.srv.SamplePeak(s.w.role, 10*time.Millisecond)
	samplerDone := make(chan struct{})
	var samplers sync.WaitGroup
	samplers.Add(2)
	go func() {
		defer samplers.Done()
		s.sampleTokens(samplerDone)
	}()
	start := time.Now()
	go func() {
		defer samplers.Done()
		s.status(samplerDone, status, tty, start)
	}()

	traffic, stop := context.WithTimeout(ctx, s.o.duration)
	defer stop()
	s.stopTraffic = stop
	var workers, faults sync.WaitGroup
	for i := 0; i < s.o.workers; i++ {
		workers.Add(1)
		go func(i int) {
			defer workers.Done()
			s.worker(traffic, i)
		}(i)
	}
	faults.Add(1)
	go func() {
		defer faults.Done()
		s.faults(traffic)
	}()
	workers.Wait()
	stop()
	faults.Wait() // the fault in progress has restored what it changed
	s.chargeRejections()
	elapsed := time.Since(start)
	close(samplerDone)
	samplers.Wait()
	checks := time.Now()
	rep := &report{o: s.o, elapsed: elapsed, baseline: baseline, setup: s.setup}
	rep.serverPeak, rep.serverSamples = serverPeak.Stop()

	// The last fault's connections (hung dials draining, dead connections
	// after a restart) settle within the recovery margin, as in every cycle.
	time.Sleep(s.o.recovery)
	rep.unanswered, rep.unansweredSamples = s.touchAll()
	rep.quiet = s.quiesce(s.o.acquireTimeout + 10*time.Second)
	rep.final = s.drv.Stats()
	s.checkStats(rep.final)

	// Close everything: every token must come back and the server must
	// see no backend of the role.
	closeHandles()
	s.drv.Close()
	rep.after = s.afterClose(10 * time.Second)
	s.proxy.close()
	s.hung.close()
	rep.goroutines, rep.goroutineDump = settleGoroutines(baseline, 5*time.Second)
	rep.checks = time.Since(checks)

	s.fill(rep)
	var buf strings.Builder
	rep.print(&buf)
	text := buf.String()
	if strings.Contains(text, password) { // the table quotes error texts
		rep.secretWhere = append(rep.secretWhere, "report")
		buf.Reset()
		rep.print(&buf)
		text = strings.ReplaceAll(buf.String(), password, "[the password]")
	}
	_, _ = io.WriteString(out, text)
	if rep.goroutineDump != "" {
		fmt.Fprintf(status, "torture: goroutines left after closing everything:\n%s\n", rep.goroutineDump)
	}
	return rep, nil
}

// sampleTokens records the most tokens the driver held, every 5ms.
func (s *soak) sampleTokens(done <-chan struct{}) {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			if n, _ := s.realServer(s.drv.Stats()); int64(n) > s.sampledOpen.Load() {
				s.sampledOpen.Store(int64(n))
			}
		}
	}
}

// status prints a line a second: rewritten in place on a terminal, one
// line each otherwise (a log, a CI job).
func (s *soak) status(done <-chan struct{}, w io.Writer, tty bool, start time.Time) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var lastOps int64
	last := start
	for {
		select {
		case <-done:
			if tty {
				fmt.Fprintln(w)
			}
			return
		case now := <-t.C:
			st := s.drv.Stats()
			s.checkStats(st)
			server := "?" // the server is restarting
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			if n, err := s.w.srv.Backends(ctx, s.w.role); err == nil {
				server = fmt.Sprint(n)
			}
			cancel()
			ops := s.tally.total.Load()
			p := s.phases.current()
			fault := faultNames[p.fault]
			if p.recovering {
				fault += " (recovering)"
			}
			// Tokens count dials and closes in progress, which the server
			// does not list as backends yet or any more.
			line := fmt.Sprintf("%7.1fs  ops %8d  %5.0f/s  errors %6d (unexpected %d)  fault %-20s  tokens %2d/%-2d (dialing %2d, closing %2d)  waiting %3d  server %s",
				now.Sub(start).Seconds(), ops, float64(ops-lastOps)/now.Sub(last).Seconds(), s.tally.errTotal.Load(),
				s.tally.unexpected.Load(), fault, st.Open, st.Limit, st.Dialing, st.Closing, st.Waiting, server)
			lastOps, last = ops, now
			if tty {
				fmt.Fprintf(w, "\r%s\x1b[K", line)
			} else {
				fmt.Fprintln(w, line)
			}
		}
	}
}

// checkStats looks for the password in the stats as a stats endpoint would
// serve them.
func (s *soak) checkStats(st tenantpg.Stats) {
	if b, err := json.Marshal(st); err == nil && bytes.Contains(b, []byte(password)) {
		s.statsHits.Add(1)
	}
}

// touchAll runs one query on every workspace after the run: all must
// answer, whatever the faults did to their connections.
func (s *soak) touchAll() (failed int, samples []string) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(s.handles) {
					return
				}
				h := s.handles[i].Load()
				ctx, cancel := context.WithTimeout(context.Background(), s.o.opTimeout)
				var v string
				err := h.db.QueryRowContext(ctx, selectV, 3).Scan(&v)
				cancel()
				if err != nil {
					mu.Lock()
					failed++
					if len(samples) < 5 {
						samples = append(samples, h.label+": "+err.Error())
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return failed, samples
}

// quiescence is the accounting once nothing is in flight.
type quiescence struct {
	ok                            bool
	waited                        time.Duration
	tokens, driverConns, server   int
	idle, inUse, dialing, closing int
	waiting                       int
	serverErr                     error
}

// quiesce waits until nothing is dialing, closing or waiting and the
// tokens, the connections the driver holds (per database, summed) and the
// server's backends for the role agree, or until timeout. It can take the
// acquire timeout and the drain timeout after the hung fault: database/sql's
// connection opener still dials the hung host for a caller who gave up, with
// no deadline but the driver's.
func (s *soak) quiesce(timeout time.Duration) quiescence {
	start := time.Now()
	for {
		st := s.drv.Stats()
		q := quiescence{tokens: st.Open, idle: st.Idle, inUse: st.InUse, dialing: st.Dialing, closing: st.Closing, waiting: st.Waiting}
		for _, d := range st.Databases {
			q.driverConns += d.Open
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		q.server, q.serverErr = s.w.srv.Backends(ctx, s.w.role)
		cancel()
		q.waited = time.Since(start)
		q.ok = q.serverErr == nil && q.dialing == 0 && q.closing == 0 && q.waiting == 0 &&
			q.tokens == q.driverConns && q.tokens == q.server && q.tokens == q.idle+q.inUse
		if q.ok || q.waited > timeout {
			return q
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// closed is the accounting after every *sql.DB and the driver are closed.
type closed struct {
	ok                      bool
	tokens, waiting, server int
	serverErr               error
}

func (s *soak) afterClose(timeout time.Duration) closed {
	deadline := time.Now().Add(timeout)
	for {
		st := s.drv.Stats()
		c := closed{tokens: st.Open, waiting: st.Waiting}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c.server, c.serverErr = s.w.srv.Backends(ctx, s.w.role)
		cancel()
		c.ok = c.serverErr == nil && c.tokens == 0 && c.waiting == 0 && c.server == 0
		if c.ok || time.Now().After(deadline) {
			return c
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// settleGoroutines waits for the goroutine count to come back to baseline
// and returns how many are left above it, with their stacks when any are.
func settleGoroutines(baseline int, timeout time.Duration) (left int, dump string) {
	deadline := time.Now().Add(timeout)
	for {
		n := runtime.NumGoroutine()
		if n <= baseline {
			return 0, ""
		}
		if time.Now().After(deadline) {
			var b strings.Builder
			_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
			return n - baseline, b.String()
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// logWatch is the driver's log destination: it counts lines and looks for
// the password in each, without keeping them (a long soak logs a lot).
type logWatch struct {
	secret string

	mu    sync.Mutex
	lines int
	warns int
	hits  int
}

func (l *logWatch) Write(p []byte) (int, error) {
	s := string(p)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines += strings.Count(s, "\n")
	if strings.Contains(s, "level=WARN") {
		l.warns++
	}
	if strings.Contains(s, l.secret) {
		l.hits++
	}
	return len(p), nil
}

// realServer sums what the driver holds to the one real server, directly
// and through the proxy: the tokens it holds now, and the sum of the two
// ways' peaks (an upper bound of the real server's peak). The hung host's
// and the refusing port's tokens never reach it.
func (s *soak) realServer(st tenantpg.Stats) (open, peak int) {
	for _, sv := range st.Servers {
		if sv.Server == s.w.addr() || sv.Server == s.proxy.addr() {
			open += sv.Open
			peak += sv.PeakOpen
		}
	}
	return open, peak
}
