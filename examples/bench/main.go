// Command bench compares ways of serving many workspace databases under one
// server-side connection limit, on the same workload (issue #6).
//
// It starts a throwaway PostgreSQL (or uses the server DATABASE_URL names, a
// superuser URL), creates an app role whose CONNECTION LIMIT is the budget B,
// so that the server itself refuses, and the harness counts, any connection
// beyond it, and W workspace databases copied from one template holding a
// kv(id int primary key, v text) table. C workers then replay a fixed trace
// of primary-key lookups (and optionally updates) over the workspaces, chosen
// by Zipf (s = 1.1) or round-robin, through each contender in turn:
//
//	tenantpg    tenantpg.NewDriver(Config{MaxConnections: B}) and OpenDB per workspace
//	seed-style  the seed design's map-of-pools manager, reimplemented from its description (seedmanager.go)
//	pgbouncer   PgBouncer in transaction mode, max_user_connections = B (pgbouncer.go)
//	naive       one sql.Open("pgx") per workspace, 3 connections each, nothing capping the sum
//	single-db   every operation on one database through one pool of B: the no-tenancy ceiling
//
// Each contender runs for -duration after -warmup, and its connections are
// closed and the server quiet before the next one starts. The trace is
// generated from fixed seeds before any contender runs, so every contender is
// offered the same operations. For each trace the harness also simulates an
// LRU cache and Belady's offline optimum with B/3 and B workspace slots, to
// show how far any replacement policy could go on it.
//
// The result is a markdown table on stdout (ready for BENCHMARKS.md), a CSV
// (-csv) and a plot of throughput and p99 latency against the number of
// workspaces (-png). A progress line goes to stderr.
//
//	go run ./examples/bench
//	go run ./examples/bench -workspaces 400,2000 -dist zipf,rr -duration 20s -csv bench.csv -png bench.png
//	go run ./examples/bench -workspaces 2000 -setup-only     # only time the creation of the databases
//
// Every database costs about 7.5 MB of disk (the copied system catalogs):
// 2,000 workspaces need about 15 GB and 10,000 about 75 GB. The harness
// checks the free space of the throwaway server's disk before creating them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	workspaces     []int
	dists          []string
	contenders     []string
	budget         int
	workers        int
	writes         float64
	rows           int
	duration       time.Duration
	warmup         time.Duration
	opTimeout      time.Duration
	acquireTimeout time.Duration
	quietTimeout   time.Duration
	traceOps       int
	seed           uint64
	csvPath        string
	pngPath        string
	occupancyPNG   string
	tenantpgPerDB  int // tenantpg's MaxConnectionsPerDB; 0 = its default (3), for experiments
	naivePerDB     int // naive's pool size per workspace; 0 = 3, for experiments
	naiveSameDB    bool
	cold           bool     // leave the workspace databases unwarmed (see world.warm)
	tls            bool     // the server (and PgBouncer, both sides) with TLS
	serverSet      []string // extra settings of the throwaway server, name=value
	pgbouncer      string
	pgbouncerSet   []string // extra PgBouncer settings, name=value
	setupOnly      bool
	simOnly        bool
	// openLoad are open-loop runs after each closed-loop one: a value up to
	// 1 is a fraction of the contender's closed-loop ops/s, above 1 an
	// absolute rate in ops/s.
	openLoad []float64
	tty      bool // stderr is a terminal: rewrite the progress line in place
}

func defaultOptions() options {
	return options{
		workspaces:     []int{400},
		dists:          []string{distZipf, distRoundRobin},
		contenders:     defaultContenders(),
		budget:         40,
		workers:        32,
		rows:           100,
		duration:       20 * time.Second,
		warmup:         2 * time.Second,
		opTimeout:      5 * time.Second,
		acquireTimeout: 3 * time.Second,
		quietTimeout:   30 * time.Second,
		traceOps:       1 << 22, // 4M: the single-database ceiling does 50k ops/s and more
		seed:           20251126,
	}
}

func main() {
	o := defaultOptions()
	wsList := intList(o.workspaces)
	flag.Var(&wsList, "workspaces", "comma-separated numbers of workspace databases, e.g. 400,2000,10000")
	dists := strList(o.dists)
	flag.Var(&dists, "dist", "comma-separated workspace choice: zipf (s = 1.1), rr (round-robin, the worst case), noisy (half the workers run pg_sleep(0.5) in workspace 0, the others read uniformly in the rest; measured: the others), quiet (the same others alone)")
	cs := strList(o.contenders)
	flag.Var(&cs, "contenders", "comma-separated contenders, run in this order: "+strings.Join(contenderNames(), ",")+" (dial-each, a new session per operation, is the server's connect rate: not run by default)")
	flag.IntVar(&o.budget, "budget", o.budget, "connection budget B: the app role's CONNECTION LIMIT and every contender's cap")
	flag.IntVar(&o.workers, "workers", o.workers, "concurrent worker goroutines C")
	flag.Float64Var(&o.writes, "writes", o.writes, "fraction of operations that update their row instead of reading it (0..1)")
	flag.IntVar(&o.rows, "rows", o.rows, "rows in each workspace's kv table")
	flag.DurationVar(&o.duration, "duration", o.duration, "measured time per contender")
	flag.DurationVar(&o.warmup, "warmup", o.warmup, "unmeasured time per contender before the measured window")
	flag.DurationVar(&o.opTimeout, "op-timeout", o.opTimeout, "deadline of each operation")
	flag.DurationVar(&o.acquireTimeout, "acquire-timeout", o.acquireTimeout, "tenantpg's AcquireTimeout")
	flag.IntVar(&o.traceOps, "trace-ops", o.traceOps, "operations in each pre-generated trace, over all workers (a worker that runs out starts over)")
	flag.Uint64Var(&o.seed, "seed", o.seed, "seed of the traces")
	flag.StringVar(&o.csvPath, "csv", "", "write the results as CSV to this file")
	flag.StringVar(&o.occupancyPNG, "occupancy-png", "", "write a plot of tenantpg's budget over time (in use, idle, dialing, closing, waiting callers) for each of its closed-loop runs to this PNG file")
	flag.StringVar(&o.pngPath, "png", "", "write a plot of throughput and p99 latency against workspaces to this PNG file")
	flag.StringVar(&o.pgbouncer, "pgbouncer", "", "pgbouncer binary (default: PATH, then /usr/sbin/pgbouncer)")
	pgbSet := strList(nil)
	flag.Var(&pgbSet, "pgbouncer-set", "comma-separated extra PgBouncer settings name=value, e.g. server_login_retry=1 (default: PgBouncer's defaults)")
	openLoad := floatList(o.openLoad)
	flag.Var(&openLoad, "open-loop", "comma-separated offered loads of open-loop runs after each closed-loop run: up to 1, a fraction of that contender's closed-loop ops/s (0.5,0.9); above 1, ops/s; Poisson arrivals, latency from the scheduled arrival")
	flag.IntVar(&o.tenantpgPerDB, "tenantpg-per-db", 0, "tenantpg's MaxConnectionsPerDB (default: its own default, 3, the other contenders' cap); for experiments")
	flag.IntVar(&o.naivePerDB, "naive-per-db", 0, "the naive contender's pool size per workspace (default 3, the other contenders' cap); for experiments")
	flag.BoolVar(&o.naiveSameDB, "naive-same-db", false, "the naive contender's pools (one per workspace) all reach the first workspace's database: many client pools, one server database; for experiments")
	srvSet := strList(nil)
	flag.Var(&srvSet, "server-set", "comma-separated extra settings of the throwaway PostgreSQL, name=value, e.g. shared_buffers=2GB (default: the test harness's, shared_buffers=64MB); ignored with DATABASE_URL")
	flag.BoolVar(&o.tls, "tls", false, "run the throwaway server with ssl=on and a self-signed certificate; every contender dials with sslmode=verify-full, PgBouncer with TLS on its client and server sides (logins are scram-sha-256 either way)")
	flag.BoolVar(&o.cold, "cold", false, "do not open a first session to each workspace database before the contenders run; the first contender then pays for every database's first session (pg_internal.init), the later ones do not")
	flag.BoolVar(&o.setupOnly, "setup-only", false, "create the databases, report how long that took, and stop")
	flag.BoolVar(&o.simOnly, "sim-only", false, "only simulate LRU and Belady on the traces, without a server (for W too large for this disk)")
	cpuProfile := flag.String("cpuprofile", "", "write the harness's CPU profile (all contenders, setup included) to this file")
	timeout := flag.Duration("timeout", 3*time.Hour, "stop everything after this long")
	flag.Parse()
	o.workspaces, o.dists, o.contenders, o.pgbouncerSet, o.openLoad, o.serverSet = wsList, dists, cs, pgbSet, openLoad, srvSet
	if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		o.tty = true
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: cpu profile:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	if _, err := run(ctx, o, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

// result is one contender's figures on one trace.
type result struct {
	workspaces int
	dist       string
	contender  string
	status     string // empty when it ran; otherwise why not ("not installed")
	m          *measurement
	opsPerSec  float64
	p50        time.Duration
	p99        time.Duration
	p999       time.Duration
	// serverConns is the number of sessions the server established for the
	// run, warm-up included (pg_stat_database.sessions), -1 when unknown.
	serverConns int64
	// reuse is 1 - serverConns / successful operations: the share of
	// operations that did not need a new backend. NaN when unknown.
	reuse  float64
	peak   int // most app-role backends the server reported at once
	budget int
	// tenantpg only: the driver's dials and its hit rate 1 - dials/ops,
	// warm-up included; -1 and NaN for the others.
	dials   int64
	hitRate float64
	note    string
	// occupancy: tenantpg only, the budget sampled every 50ms, warm-up
	// included.
	occupancy []occupancy
}

// creation records how long creating workspace databases took.
type creation struct {
	total, created int
	took           time.Duration
	warmed         time.Duration // the first session to each created database; 0 with -cold
}

// report is everything one invocation measured.
type report struct {
	opts      options
	server    string
	pgbouncer string // version, or "not installed"
	creations []creation
	results   []result
	sims      []simResult
}

func run(ctx context.Context, o options, stdout, stderr io.Writer) (*report, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	contenders, err := selectContenders(o.contenders)
	if err != nil {
		return nil, err
	}
	rep := &report{opts: o, pgbouncer: "not installed"}
	if o.simOnly {
		for _, n := range o.workspaces {
			for _, dist := range o.dists {
				perWorker := (o.traceOps + o.workers - 1) / o.workers
				tr, err := newTrace(dist, n, o.workers, perWorker, o.rows, o.writes, o.seed)
				if err != nil {
					return rep, err
				}
				rep.sims = append(rep.sims, simulate(tr, o.budget)...)
			}
		}
		writeTable(stdout, rep)
		return rep, nil
	}
	e := &env{budget: o.budget, workers: o.workers, acquireTimeout: o.acquireTimeout, pgbouncerSet: o.pgbouncerSet, tenantpgPerDB: o.tenantpgPerDB, naivePerDB: o.naivePerDB, naiveSameDB: o.naiveSameDB}
	if bin, err := findPgbouncer(o.pgbouncer); err == nil {
		e.pgbouncerBin = bin
		rep.pgbouncer = pgbouncerVersion(bin)
	}

	fmt.Fprintf(stderr, "starting PostgreSQL (or attaching to DATABASE_URL)...\n")
	w, err := startWorld(ctx, o.budget, o.workers, o.rows, o.serverSet, o.tls, stderr)
	if err != nil {
		return nil, err
	}
	defer w.stop()
	e.w = w
	rep.server = w.serverVersion(ctx)

	sizes := slices.Clone(o.workspaces)
	slices.Sort(sizes) // ascending: each size creates only the databases the previous one lacked
	sizes = slices.Compact(sizes)
	for _, n := range sizes {
		fmt.Fprintf(stderr, "creating workspace databases up to %d...\n", n)
		created, took, err := w.ensureDatabases(ctx, n, stderr)
		if err != nil {
			return rep, err
		}
		rep.creations = append(rep.creations, creation{total: n, created: created, took: took})
		fmt.Fprintf(stderr, "created %d workspace databases (now %d) in %s (%.1f/s)\n",
			created, n, took.Round(time.Millisecond), float64(created)/math.Max(took.Seconds(), 1e-9))
		if created > 0 && !o.cold {
			start := time.Now()
			if err := w.warm(ctx, n-created, n); err != nil {
				return rep, err
			}
			rep.creations[len(rep.creations)-1].warmed = time.Since(start)
			fmt.Fprintf(stderr, "first session to each of them in %s\n", time.Since(start).Round(time.Millisecond))
		}
		if o.setupOnly {
			continue
		}
		for _, dist := range o.dists {
			perWorker := (o.traceOps + o.workers - 1) / o.workers
			tr, err := newTrace(dist, n, o.workers, perWorker, o.rows, o.writes, o.seed)
			if err != nil {
				return rep, err
			}
			rep.sims = append(rep.sims, simulate(tr, o.budget)...)
			for _, c := range contenders {
				res, err := runContender(ctx, e, c, tr, o, stderr, 0)
				if err != nil {
					return rep, fmt.Errorf("W=%d %s %s: %w", n, dist, c.name, err)
				}
				rep.results = append(rep.results, res)
				if res.status != "" {
					continue
				}
				for _, load := range o.openLoad {
					rate := load
					if load <= 1 {
						rate = load * res.opsPerSec
					}
					if rate <= 0 {
						continue
					}
					open, err := runContender(ctx, e, c, tr, o, stderr, rate)
					if err != nil {
						return rep, fmt.Errorf("W=%d %s %s open loop at %.0f ops/s: %w", n, dist, c.name, rate, err)
					}
					open.contender = fmt.Sprintf("%s open %.0f/s", c.name, rate)
					if load <= 1 {
						open.contender = fmt.Sprintf("%s open %.0f%% (%.0f/s)", c.name, load*100, rate)
					}
					rep.results = append(rep.results, open)
				}
			}
		}
	}

	writeTable(stdout, rep)
	if o.csvPath != "" && !o.setupOnly {
		if err := writeCSV(o.csvPath, rep); err != nil {
			return rep, err
		}
	}
	if o.pngPath != "" && !o.setupOnly {
		if err := writePNG(o.pngPath, rep); err != nil {
			return rep, err
		}
	}
	if o.occupancyPNG != "" && !o.setupOnly {
		if err := writeOccupancyPNG(o.occupancyPNG, rep); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

func (o *options) validate() error {
	switch {
	case len(o.workspaces) == 0:
		return errors.New("-workspaces: give at least one number")
	case slices.Min(o.workspaces) < 1:
		return errors.New("-workspaces: every number must be at least 1")
	case len(o.dists) == 0:
		return errors.New("-dist: give zipf, rr or both")
	case o.budget < 3:
		return errors.New("-budget must be at least 3 (one workspace's cap)")
	case o.workers < 1:
		return errors.New("-workers must be at least 1")
	case o.writes < 0 || o.writes > 1:
		return errors.New("-writes must be between 0 and 1")
	case o.rows < 1:
		return errors.New("-rows must be at least 1")
	case o.duration <= 0 || o.warmup < 0 || o.opTimeout <= 0 || o.acquireTimeout <= 0:
		return errors.New("-duration, -op-timeout and -acquire-timeout must be positive, -warmup not negative")
	case o.traceOps < o.workers:
		return errors.New("-trace-ops must be at least -workers")
	case slices.ContainsFunc(o.openLoad, func(l float64) bool { return l <= 0 }):
		return errors.New("-open-loop: every load must be positive")
	}
	for _, kv := range o.pgbouncerSet {
		name, _, ok := strings.Cut(kv, "=")
		if !ok || strings.TrimSpace(name) == "" || strings.ContainsAny(kv, "\r\n[]") {
			return fmt.Errorf("-pgbouncer-set: want name=value, got %q", kv)
		}
	}
	for _, kv := range o.serverSet {
		name, _, ok := strings.Cut(kv, "=")
		if !ok || strings.TrimSpace(name) == "" || strings.ContainsAny(kv, "\r\n") {
			return fmt.Errorf("-server-set: want name=value, got %q", kv)
		}
	}
	for _, d := range o.dists {
		if !slices.Contains([]string{distZipf, distRoundRobin, distNoisy, distQuiet}, d) {
			return fmt.Errorf("-dist: unknown distribution %q (want zipf, rr, noisy or quiet)", d)
		}
	}
	return nil
}

// closeTimeout bounds closing a contender's connections.
const closeTimeout = 15 * time.Second

// runContender runs one contender on one trace, from a quiet server back
// to a quiet server.
// A positive rate runs it open-loop at that many operations per second.
func runContender(ctx context.Context, e *env, c contender, tr *trace, o options, stderr io.Writer, rate float64) (result, error) {
	res := result{workspaces: tr.workspaces, dist: tr.dist, contender: c.name, budget: o.budget,
		serverConns: -1, reuse: math.NaN(), dials: -1, hitRate: math.NaN()}
	if err := e.w.waitQuiet(ctx, o.quietTimeout); err != nil {
		return res, err
	}
	before, err := e.w.sessions(ctx)
	if err != nil {
		return res, err
	}
	tgt, err := c.open(ctx, e, tr.workspaces)
	if errors.Is(err, errUnavailable) {
		res.status = "not installed"
		if !errors.Is(err, errNotInstalled) {
			res.status = "unavailable"
		}
		fmt.Fprintf(stderr, "[W=%d %s] %-10s %s\n", tr.workspaces, tr.dist, c.name, res.status)
		return res, nil
	}
	if err != nil {
		return res, err
	}
	sampler := e.w.srv.SamplePeak(e.w.role, 20*time.Millisecond)
	fail := func(err error) (result, error) {
		sampler.Stop()
		return res, err
	}

	var lv live
	progressDone := make(chan struct{})
	progressStopped := make(chan struct{})
	go func() {
		defer close(progressStopped)
		progress(stderr, o, tr, c.name, &lv, sampler, progressDone)
	}()
	var tokens *tokenSampler
	if s, ok := tgt.(statser); ok {
		tokens = sampleTokens(s, 50*time.Millisecond)
	}
	cpu0 := processCPU()
	var m *measurement
	if rate > 0 {
		m = driveOpen(ctx, tgt, tr, rate, o.warmup, o.duration, o.opTimeout, &lv, o.seed)
	} else {
		m = drive(ctx, tgt, tr, o.warmup, o.duration, o.opTimeout, &lv)
	}
	cpu := processCPU() - cpu0
	close(progressDone)
	<-progressStopped

	if s, ok := tgt.(statser); ok {
		avg, samples := tokens.stop()
		res.occupancy = samples
		st := s.stats()
		res.dials = int64(st.Dials)
		if m.totalOps > 0 {
			res.hitRate = 1 - float64(st.Dials)/float64(m.totalOps)
		}
		res.note = fmt.Sprintf("driver peak %d, dials refused %d, evictions %v, %.0f dials/s; budget on average: %s",
			st.PeakOpen, st.DialErrors["rejected"], nonZero(st.Evictions), float64(st.Dials)/(o.warmup+m.window).Seconds(), avg)
	}
	var notes []string
	if res.note != "" {
		notes = append(notes, res.note)
	}
	if m.totalOps > 0 {
		// The harness's own CPU, its workers' included, over warm-up and
		// window: compare contenders side by side, not as absolutes.
		notes = append(notes, fmt.Sprintf("harness CPU %.1f µs/op (%.2f cores)",
			float64(cpu.Microseconds())/float64(m.totalOps), cpu.Seconds()/(o.warmup+m.window).Seconds()))
	}
	if m.stuck > 0 {
		notes = append(notes, fmt.Sprintf("%d workers stuck in an operation past its deadline, abandoned", m.stuck))
	}
	// Closing is bounded too: a contender whose operations are stuck may
	// not close either.
	closed := make(chan error, 1)
	go func() { closed <- tgt.close() }()
	select {
	case err := <-closed:
		if err != nil {
			return fail(fmt.Errorf("close: %w", err))
		}
	case <-time.After(closeTimeout):
		notes = append(notes, fmt.Sprintf("close did not return within %s", closeTimeout))
	}
	quiet := o.quietTimeout
	if m.stuck > 0 {
		quiet = 5 * time.Second // a stuck operation holds its backend: no use waiting long
	}
	if err := e.w.waitQuiet(ctx, quiet); err != nil {
		// Leftover backends would count against the next contender's
		// limit: end them, and say so.
		n, terr := e.w.srv.TerminateBackends(ctx, e.w.role)
		if terr != nil {
			return fail(fmt.Errorf("%w; terminating them: %w", err, terr))
		}
		notes = append(notes, fmt.Sprintf("%d backends left after close, terminated", n))
		if err := e.w.waitQuiet(ctx, o.quietTimeout); err != nil {
			return fail(err)
		}
	}
	res.peak, _ = sampler.Stop()
	res.note = strings.Join(notes, "; ")
	after, err := e.w.sessions(ctx)
	if err != nil {
		return res, err
	}
	if before >= 0 && after >= 0 {
		res.serverConns = after - before
		if m.totalOps > 0 {
			res.reuse = 1 - float64(res.serverConns)/float64(m.totalOps)
		}
	}

	res.m = m
	res.opsPerSec = float64(m.ops) / m.window.Seconds()
	res.p50, res.p99, res.p999 = percentile(m.lat, 50), percentile(m.lat, 99), percentile(m.lat, 99.9)
	if m.wrapped {
		res.note = strings.TrimPrefix(res.note+"; trace wrapped (raise -trace-ops)", "; ")
	}
	if m.stuck > 0 || strings.Contains(res.note, "close did not return") {
		fmt.Fprintf(stderr, "[W=%d %s] %-10s WARNING: %s\n", tr.workspaces, tr.dist, c.name, res.note)
	}
	fmt.Fprintf(stderr, "[W=%d %s] %-10s %8.0f ops/s  p99 %7.2f ms  errors %d (%s)  server conns %d  peak %d/%d\n",
		tr.workspaces, tr.dist, c.name, res.opsPerSec, ms(res.p99), m.errors(), errBreakdown(m), res.serverConns, res.peak, o.budget)
	for k, s := range m.firstErr {
		if s != "" {
			fmt.Fprintf(stderr, "    first %s error: %s\n", errKindNames[k], s)
		}
	}
	return res, nil
}

// progress prints a status line every second until done.
func progress(out io.Writer, o options, tr *trace, name string, lv *live, sampler interface{ Peak() int }, done <-chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	start := time.Now()
	var lastOK int64
	for tick := 1; ; tick++ {
		select {
		case <-done:
			if o.tty {
				fmt.Fprint(out, "\r\033[K")
			}
			return
		case <-t.C:
		}
		ok := lv.ok.Load()
		phase := "warm-up"
		if lv.phase.Load() != phaseWarmup {
			phase = "measuring"
		}
		line := fmt.Sprintf("[W=%d %s] %-10s %-9s %3.0fs  %6d ops/s  ok %d  errors %d  server peak %d/%d",
			tr.workspaces, tr.dist, name, phase, time.Since(start).Seconds(), ok-lastOK, ok, lv.errs.Load(), sampler.Peak(), o.budget)
		lastOK = ok
		switch {
		case o.tty:
			fmt.Fprint(out, "\r\033[K"+line)
		case tick%5 == 0:
			fmt.Fprintln(out, line)
		}
	}
}

func errBreakdown(m *measurement) string {
	parts := make([]string, 0, numErrKinds)
	for k, n := range m.errs {
		parts = append(parts, fmt.Sprintf("%s %d", errKindNames[k], n))
	}
	return strings.Join(parts, ", ")
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// intList and strList are comma-separated flag values.
type intList []int

func (l *intList) String() string {
	s := make([]string, len(*l))
	for i, v := range *l {
		s[i] = strconv.Itoa(v)
	}
	return strings.Join(s, ",")
}

func (l *intList) Set(v string) error {
	*l = nil
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(strings.ReplaceAll(f, "_", "")))
		if err != nil {
			return fmt.Errorf("not a number: %q", f)
		}
		*l = append(*l, n)
	}
	return nil
}

type strList []string

func (l *strList) String() string { return strings.Join(*l, ",") }

func (l *strList) Set(v string) error {
	*l = nil
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			*l = append(*l, f)
		}
	}
	return nil
}

type floatList []float64

func (l *floatList) String() string {
	s := make([]string, len(*l))
	for i, v := range *l {
		s[i] = strconv.FormatFloat(v, 'g', -1, 64)
	}
	return strings.Join(s, ",")
}

func (l *floatList) Set(v string) error {
	*l = nil
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		x, err := strconv.ParseFloat(f, 64)
		if err != nil {
			return fmt.Errorf("not a number: %q", f)
		}
		*l = append(*l, x)
	}
	return nil
}

// processCPU is the user and system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
