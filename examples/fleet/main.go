// Command fleet measures issue #12's fleet budget: N replica processes
// sharing one PostgreSQL role whose CONNECTION LIMIT is F, under a load that
// moves from replica to replica, in three modes run one after another with
// the same seed and schedule:
//
//	fleet          TENANTPG_FLEET_MAX_CONNECTIONS=F and TENANTPG_MAX_CONNECTIONS=F:
//	               the replicas share F through the library's coordination
//	static         TENANTPG_MAX_CONNECTIONS=F/N each: no replica can borrow
//	uncoordinated  TENANTPG_MAX_CONNECTIONS=F each: the server refuses the excess
//	               (53300) and the driver retries
//	single         the ideal the fleet is measured against: ONE process with
//	               TENANTPG_MAX_CONNECTIONS=F (or -single-budget) that runs
//	               every replica's workers, with the same seeds and schedule
//	               (the hot replica's workers in each phase, the others' cold
//	               ones), so the offered load is the fleet's; it holds the
//	               whole budget, pays no coordination and moves nothing
//	partitioned    as single, but each replica's workers use their own
//	               *sql.DB (own pools, as in a replica process): the
//	               fleet's partition of sessions without its coordination
//
// By default the modes fleet, static and uncoordinated run; -modes picks
// others (fleet,single,static for issue #22's fleet/single and fleet/static
// ratios, which the summary reports).
//
// Share moves (fleet mode): every replica samples its driver's Stats each
// -share-every (10 ms) and times, from the first sample with a caller
// queued at its limit (Waiting > 0 and Open ≥ Limit) to the first with a
// newly leased slot (FleetStats.Leased grew), how fast a share moves to a
// replica that needs it; the report gives p50/p99 over every such move and
// over the first one of each hot phase, and how long after its phase
// starts the hot replica's share reaches 90% of what the others leave it.
//
// The replicas are OS processes (the program re-executes itself), configured
// only through those environment variables, so a build of the library
// without the fleet feature runs fleet mode as uncoordinated. Each replica
// runs -workers closed-loop workers doing primary-key reads on Zipf-chosen
// workspaces while it is hot, -cold-workers otherwise; replica p%N is hot in
// phase p. Each prints one JSON line per second on stdout, which the parent
// aggregates. The parent samples the role's sessions in pg_stat_activity
// every 10 ms, counts the server's 53300 refusals from its log, and in fleet
// mode (-kill) SIGKILLs a non-hot replica mid-run and measures how long
// until the survivors hold more sessions than before: its slots serve them.
//
//	cd examples && go run ./fleet
//	go run ./fleet -kill=false -modes fleet,single,static,single,fleet   # issue #22's ratios, alternated
//	go run ./fleet -kill=false -modes fleet,fleet@45,single,single@35    # the fleet given its 5 slots back, the ideal without them
//	go run ./fleet -kill=false -modes single,partitioned,fleet,static    # the partition's share of fleet/single
//	go run ./fleet -replicas 2 -phase 5s -duration 20s -modes static,uncoordinated
//
// Without -dsn (or DATABASE_URL, a superuser URL) it starts a throwaway
// PostgreSQL from the local binaries; with one, it creates its role and
// databases there under a prefix and drops them at the end, and cannot
// count refusals (the server log is not ours).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"time"
)

type options struct {
	replicas, workers, coldWorkers int
	workspaces, fleetBudget, rows  int
	phase, duration                time.Duration
	opTimeout                      time.Duration
	lead                           time.Duration // from starting the replicas to their common start
	sampleEvery                    time.Duration
	modes                          []string
	shareEvery                     time.Duration // fleet replicas' Stats sampling for share moves (0: off)
	kill                           bool
	cold                           bool // leave the workspace databases unwarmed (see warm)
	timeline                       bool
	seed                           int64
	zipfS                          float64
	dsn                            string
}

var allModes = []string{"fleet", "single", "partitioned", "static", "uncoordinated"}

func defaultOptions() options {
	return options{
		replicas: 4, workers: 16, coldWorkers: 1,
		workspaces: 400, fleetBudget: 40, rows: 100,
		phase: 10 * time.Second, duration: 40 * time.Second,
		opTimeout: 10 * time.Second, lead: 2 * time.Second, sampleEvery: 10 * time.Millisecond,
		modes: []string{"fleet", "static", "uncoordinated"}, kill: true, seed: 1, zipfS: 1.1,
		shareEvery: 10 * time.Millisecond,
	}
}

func main() {
	if len(os.Args) > 2 && os.Args[1] == childFlag {
		os.Exit(childMain(os.Args[2], os.Stdout, os.Stderr))
	}
	o := defaultOptions()
	flag.IntVar(&o.replicas, "replicas", o.replicas, "replica processes N")
	flag.IntVar(&o.workers, "workers", o.workers, "closed-loop workers per replica while it is hot")
	flag.IntVar(&o.coldWorkers, "cold-workers", o.coldWorkers, "workers per replica while it is not hot (0: idle)")
	flag.IntVar(&o.workspaces, "workspaces", o.workspaces, "workspace databases W")
	flag.IntVar(&o.fleetBudget, "fleet-budget", o.fleetBudget, "F: the role's CONNECTION LIMIT and the fleet budget")
	flag.DurationVar(&o.phase, "phase", o.phase, "how long each replica stays hot (whole seconds)")
	flag.DurationVar(&o.duration, "duration", o.duration, "traffic per mode (whole seconds)")
	flag.DurationVar(&o.opTimeout, "op-timeout", o.opTimeout, "deadline of one read")
	modes := flag.String("modes", strings.Join(o.modes, ","), "modes to run, in order: fleet, single, partitioned, static, uncoordinated; mode@B runs it with budget B instead of F (the role's CONNECTION LIMIT follows in fleet, static and uncoordinated); a mode may repeat")
	flag.DurationVar(&o.shareEvery, "share-every", o.shareEvery, "fleet replicas sample their driver's Stats this often to time share moves (0: off)")
	flag.BoolVar(&o.cold, "cold", false, "do not open a first session to each workspace database before the modes run; the first mode then pays for every database's first session (pg_internal.init), the later ones do not")
	flag.BoolVar(&o.timeline, "timeline", false, "print each replica's ops/open/fleet share/waiting per second")
	flag.BoolVar(&o.kill, "kill", o.kill, "in fleet mode, SIGKILL a non-hot replica mid-run and time the reuse of its slots")
	flag.Int64Var(&o.seed, "seed", o.seed, "seed of the workers' random streams (the same in every mode)")
	flag.Float64Var(&o.zipfS, "zipf", o.zipfS, "Zipf exponent s (> 1) of the workspace choice")
	flag.StringVar(&o.dsn, "dsn", os.Getenv("DATABASE_URL"), "superuser URL of an existing server (default: a throwaway one; env DATABASE_URL)")
	flag.Usage = func() {
		fmt.Fprint(flag.CommandLine.Output(), `Usage: fleet [flags]

Runs N replica processes sharing one role's CONNECTION LIMIT F under a load
that moves from replica to replica, once per mode:
  fleet          TENANTPG_FLEET_MAX_CONNECTIONS=F: the replicas share F
  single         one process with TENANTPG_MAX_CONNECTIONS=F (-single-budget)
                 running every replica's workers (same seeds and schedule):
                 the ideal the fleet is measured against (fleet/single)
  partitioned    as single, each replica's workers on their own *sql.DB:
                 the fleet's partition of sessions, one budget, no coordination
  static         TENANTPG_MAX_CONNECTIONS=F/N each
  uncoordinated  TENANTPG_MAX_CONNECTIONS=F each (the server refuses the excess)

Flags:
`)
		flag.PrintDefaults()
	}
	flag.Parse()
	o.modes = strings.Split(*modes, ",")

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	rep, err := run(ctx, o, os.Stdout, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(1)
	}
	if len(rep.problems()) > 0 {
		os.Exit(1)
	}
}

func (o options) validate() error {
	for _, m := range o.modes {
		kind, b, err := parseMode(m, o.fleetBudget)
		if err != nil {
			return err
		}
		if !strings.Contains(","+strings.Join(allModes, ",")+",", ","+kind+",") {
			return fmt.Errorf("unknown mode %q (want %s)", m, strings.Join(allModes, ", "))
		}
		if b < o.replicas || b < 2 {
			return fmt.Errorf("mode %q: need a budget ≥ replicas and ≥ 2", m)
		}
	}
	switch {
	case o.replicas < 1 || o.workers < 1 || o.coldWorkers < 0 || o.coldWorkers > o.workers:
		return fmt.Errorf("need replicas ≥ 1, workers ≥ 1 and 0 ≤ cold-workers ≤ workers")
	case o.workspaces < 2 || o.fleetBudget < o.replicas:
		return fmt.Errorf("need workspaces ≥ 2 and fleet-budget ≥ replicas (static mode gives each F/N)")
	case o.phase < time.Second || o.phase%time.Second != 0 || o.duration < o.phase || o.duration%time.Second != 0:
		// The replicas report by the second, so phases are whole seconds.
		return fmt.Errorf("phase and duration must be whole seconds, duration ≥ phase ≥ 1s")
	case o.shareEvery < 0:
		return fmt.Errorf("need share-every ≥ 0")
	case o.zipfS <= 1:
		return fmt.Errorf("zipf must be > 1")
	}
	return nil
}

// maxBudget is the largest budget of any mode: the server's
// max_connections must leave room above it.
func (o options) maxBudget() int {
	b := o.fleetBudget
	for _, m := range o.modes {
		if _, mb, err := parseMode(m, o.fleetBudget); err == nil {
			b = max(b, mb)
		}
	}
	return b
}

// parseMode splits "mode" or "mode@B" into the mode and its budget (F
// without @B).
func parseMode(m string, f int) (kind string, budget int, err error) {
	kind, b, ok := strings.Cut(m, "@")
	if !ok {
		return kind, f, nil
	}
	budget, err = strconv.Atoi(b)
	if err != nil {
		return "", 0, fmt.Errorf("mode %q: the budget after @ must be an integer", m)
	}
	return kind, budget, nil
}

// shareTarget is the share the hot fleet replica is timed to reach in its
// phase: 90% of what the budget leaves it when every other replica keeps
// one backend per cold worker (F, less the door, the N coordination
// sessions and the others' backends).
func (o options) shareTarget() int {
	return max(1, (o.fleetBudget-1-o.replicas-(o.replicas-1)*o.coldWorkers)*9/10)
}

// run sets up the server once and runs each mode in turn.
func run(ctx context.Context, o options, stdout, status io.Writer) (*report, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	status = &lockedWriter{w: status}
	w, err := startWorld(ctx, o, status)
	if err != nil {
		return nil, err
	}
	defer w.stop()
	smp, err := w.sample(o.sampleEvery, fleetDatabase())
	if err != nil {
		return nil, err
	}
	defer smp.stop()
	lw := w.watchLog(o.sampleEvery)
	defer lw.stop()

	rep := &report{o: o, external: w.external}
	for _, m := range o.modes {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		fmt.Fprintf(status, "mode %s: %d replicas, %s, %s\n", m, o.replicas, o.duration, loadAvg())
		kind, budget, _ := parseMode(m, o.fleetBudget)
		mo := o
		mo.fleetBudget = budget
		if kind != "single" && kind != "partitioned" && budget != w.connLimit {
			// The role's CONNECTION LIMIT is the budget under test.
			if err := w.setConnLimit(ctx, budget); err != nil {
				return nil, err
			}
		}
		r, err := runMode(ctx, mo, w, kind, smp, lw, status)
		if err != nil {
			return nil, fmt.Errorf("mode %s: %w", m, err)
		}
		r.label, r.budget, r.connLimit = m, budget, w.connLimit
		rep.modes = append(rep.modes, r)
		fmt.Fprintf(status, "  %.0f ops/s, caller errors %s, role peak %d/%d, %s refusals in the server log\n",
			rep.opsPerSec(r), r.errorText(), r.peak, w.connLimit, rep.refusedText(r))
	}
	rep.write(stdout)
	return rep, nil
}

// fleetDatabase is where the library's coordination sessions connect
// (TENANTPG_FLEET_DATABASE, default postgres); the sampler counts them.
func fleetDatabase() string {
	if db := os.Getenv("TENANTPG_FLEET_DATABASE"); db != "" {
		return db
	}
	return "postgres"
}
