// Command torture is tenantpg's soak test: it runs mixed traffic over
// hundreds of workspace databases through one driver with a small budget,
// injects faults in rotation against a throwaway PostgreSQL, and ends with a
// table of what happened and the checks that matter after such a run: the
// server never saw more connections than the budget, no token, waiter,
// connection or goroutine was left behind, no error nobody expected, and no
// password in any error, log line or stats snapshot.
//
// The faults, in the default rotation:
//
//	kill     pg_terminate_backend on random backends of the app role, under load
//	restart  fast shutdown of the server and a start on the same port
//	limit    the role's CONNECTION LIMIT below the budget for a while (53300)
//	hung     workspaces behind a listener that accepts and never answers, one
//	         whose port refuses, and slow dials (a proxy that delays) for others
//	storm    thousands of callers with short deadlines or cancelled, at a full budget
//	misuse   a *sql.Conn held long, db.Close() while queries run, Configure to a
//	         tiny budget and back
//
// Every fault has a window (active, then a recovery margin); an error is
// attributed to the fault whose window its operation overlapped. Errors
// outside every window, and errors of no known kind, are unexpected and make
// the exit status non-zero, as do leaks. The run stops by itself after
// -duration, -max-ops operations or -rotations full rotations of the faults,
// whichever comes first.
//
//	go run ./examples/torture                  # one minute
//	go run ./examples/torture -duration 10m    # the soak
//	go run ./examples/torture -faults kill,restart -fault-every 5s
//
// Without DATABASE_URL it starts a throwaway PostgreSQL from the local
// binaries (initdb and postgres in PATH or /usr/lib/postgresql/*/bin). With
// DATABASE_URL (a superuser URL) it creates its role and databases there,
// under a prefix, drops them at the end, and leaves out the restart fault.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"time"
)

type options struct {
	duration   time.Duration
	maxOps     int64
	rotations  int
	workspaces int
	workers    int
	budget     int
	perDB      int
	faultEvery time.Duration
	recovery   time.Duration
	faults     []faultKind
	storm      int
	seed       uint64
	// acquireTimeout is the driver's AcquireTimeout and opTimeout the
	// deadline of one traffic operation: both bound how long the run can
	// take to stop once traffic is told to.
	acquireTimeout time.Duration
	opTimeout      time.Duration
}

func defaultOptions() options {
	return options{
		duration:       60 * time.Second,
		maxOps:         2_000_000,
		workspaces:     200,
		workers:        32,
		budget:         20,
		perDB:          3,
		faultEvery:     3 * time.Second,
		recovery:       time.Second,
		faults:         allFaults(),
		storm:          2000,
		seed:           1,
		acquireTimeout: 5 * time.Second,
		opTimeout:      10 * time.Second,
	}
}

func main() {
	o := defaultOptions()
	faults := faultList(o.faults)
	flag.DurationVar(&o.duration, "duration", o.duration, "how long to run traffic (the soak: 10m)")
	flag.Int64Var(&o.maxOps, "max-ops", o.maxOps, "stop after this many operations (0: no bound but -duration)")
	flag.IntVar(&o.rotations, "rotations", 0, "stop after this many full rotations of the faults and a quiet period (0: no bound but -duration)")
	flag.IntVar(&o.workspaces, "workspaces", o.workspaces, "workspace databases to create")
	flag.IntVar(&o.workers, "workers", o.workers, "goroutines running mixed traffic")
	flag.IntVar(&o.budget, "budget", o.budget, "the driver's connection budget; also the app role's CONNECTION LIMIT")
	flag.IntVar(&o.perDB, "per-db", o.perDB, "connections per workspace database")
	flag.DurationVar(&o.faultEvery, "fault-every", o.faultEvery, "one fault per this period: 40% active, then the recovery margin, then quiet")
	flag.DurationVar(&o.recovery, "recovery", o.recovery, "margin after a fault during which errors are still attributed to it")
	flag.StringVar(&faults, "faults", faults, "the rotation, comma-separated: "+faultList(allFaults()))
	flag.IntVar(&o.storm, "storm", o.storm, "callers per burst of the context storm")
	flag.Uint64Var(&o.seed, "seed", o.seed, "seed for workspace, operation and fault choices (timing is not reproducible)")
	flag.Parse()
	var err error
	if o.faults, err = parseFaults(faults); err != nil {
		fmt.Fprintln(os.Stderr, "torture:", err)
		os.Exit(2)
	}
	if err := o.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "torture:", err)
		os.Exit(2)
	}

	// Ctrl-C ends traffic early; the checks and the table still run.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	// A soak must stop by itself even if the code under test hangs: past
	// every bound the run has, dump the goroutines and give up.
	watchdog := time.AfterFunc(o.duration+o.opTimeout+3*time.Minute, func() {
		fmt.Fprintln(os.Stderr, "torture: watchdog: the run did not end; goroutines:")
		_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		os.Exit(3)
	})
	defer watchdog.Stop()

	rep, err := run(ctx, o, os.Stdout, os.Stderr, isTerminal(os.Stderr))
	if err != nil {
		fmt.Fprintln(os.Stderr, "torture:", err)
		os.Exit(2)
	}
	if fails := rep.failures(); len(fails) > 0 {
		fmt.Fprintln(os.Stderr, "torture: FAIL:", strings.Join(fails, "; "))
		os.Exit(1)
	}
}

func (o options) validate() error {
	switch {
	case o.duration <= 0:
		return fmt.Errorf("-duration must be positive: the run must stop by itself")
	case o.maxOps < 0 || o.rotations < 0:
		return fmt.Errorf("-max-ops and -rotations must not be negative")
	case o.workspaces < 10:
		return fmt.Errorf("-workspaces must be at least 10")
	case o.workers < 1 || o.budget < 4:
		return fmt.Errorf("-workers must be at least 1 and -budget at least 4")
	case o.perDB < 1 || o.perDB > o.budget:
		return fmt.Errorf("-per-db must be between 1 and the budget")
	case o.faultEvery < 100*time.Millisecond || o.recovery < 0:
		return fmt.Errorf("-fault-every must be at least 100ms and -recovery not negative")
	case o.storm < 1:
		return fmt.Errorf("-storm must be at least 1")
	}
	return nil
}

// isTerminal reports whether f is a character device, where the status line
// can rewrite itself with \r instead of scrolling.
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// run sets up the world, runs traffic and faults until the duration or the
// operation count is reached (or ctx ends), checks the invariants and writes
// the table to out. The error is for a run that could not start; what the
// run found is in the report.
func run(ctx context.Context, o options, out, status io.Writer, tty bool) (*report, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	fmt.Fprintf(status, "torture: starting PostgreSQL (or attaching to DATABASE_URL) and creating %d workspace databases...\n", o.workspaces)
	setupStart := time.Now()
	w, err := startWorld(ctx, o)
	if err != nil {
		return nil, err
	}
	defer w.stop()
	if !w.restartable {
		o.faults = without(o.faults, faultRestart)
		fmt.Fprintln(status, "torture: the server was not started here (DATABASE_URL): no restart fault")
		if len(o.faults) == 0 {
			o.faults = []faultKind{faultKill}
		}
	}
	s := newSoak(o, w)
	s.setup = time.Since(setupStart)
	return s.run(ctx, out, status, tty)
}
