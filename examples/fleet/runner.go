package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// modeResult is what one mode produced.
type modeResult struct {
	mode       string // fleet, single, partitioned, static or uncoordinated
	label      string // as given in -modes: mode or mode@B
	budget     int    // B: F, or the budget of mode@B
	connLimit  int    // the role's CONNECTION LIMIT during the mode
	perReplica int    // TENANTPG_MAX_CONNECTIONS of each replica

	ops          int64 // successful reads that ended within the run
	opsByPhase   []int64
	opsByReplica []int64
	errs         map[string]int64
	firstErr     string
	hist         map[int]int64
	lines        int    // per-second lines parsed
	badLines     int    // stdout lines that were not JSON
	finals       int    // replicas that reached their final line
	rejected     uint64 // the drivers' dials refused with 53300, summed over replicas
	dials        uint64 // the drivers' dials, summed over replicas
	yielded      uint64 // backends closed for another replica, summed over replicas
	roundTrips   uint64 // statements on the coordination sessions, summed over replicas
	dbs          int    // routed *sql.DBs the workers read through, summed over replicas

	peak, coordPeak, samples int
	refused                  int  // 53300 lines in the server log
	refusedLossy             bool // some may have scrolled past
	exitErrs                 []string
	kill                     *killResult
	// timeline holds every replica's per-second lines by second, for
	// -timeline.
	timeline map[int][]line

	// loadBefore and loadAfter are /proc/loadavg's first three fields
	// when the mode's replicas start and after they end ("" elsewhere).
	loadBefore, loadAfter string

	// Share moves (fleet mode, see line.Moves), by replica, in ms since
	// the common start.
	moves   [][]move
	cleared int
	reached [][]int
}

// killResult is the kill -9 measurement of fleet mode.
type killResult struct {
	victim     int
	at         time.Duration // since the common start
	held       int           // the victim's sessions just before
	survivors  int           // the other replicas' most sessions in the second before
	goneAfter  time.Duration // until the server shows none of the victim's sessions; -1: never
	reuseAfter time.Duration // until the survivors hold more than before; -1: never
	skipped    string        // why no replica was killed
}

// modeEnv is the driver configuration of each replica in a mode: the only
// way the program talks to the library's budget.
func modeEnv(mode string, o options) (env []string, perReplica int) {
	f := strconv.Itoa(o.fleetBudget)
	switch mode {
	case "fleet":
		env = []string{"TENANTPG_FLEET_MAX_CONNECTIONS=" + f, "TENANTPG_MAX_CONNECTIONS=" + f}
		// The fleet's name and database pass through if the user set them.
		for _, k := range []string{"TENANTPG_FLEET_NAME", "TENANTPG_FLEET_DATABASE"} {
			if v, ok := os.LookupEnv(k); ok {
				env = append(env, k+"="+v)
			}
		}
		return env, o.fleetBudget
	case "single", "partitioned":
		return []string{"TENANTPG_MAX_CONNECTIONS=" + f}, o.fleetBudget
	case "static":
		perReplica = o.fleetBudget / o.replicas
		return []string{"TENANTPG_MAX_CONNECTIONS=" + strconv.Itoa(perReplica)}, perReplica
	default: // uncoordinated
		return []string{"TENANTPG_MAX_CONNECTIONS=" + f}, o.fleetBudget
	}
}

// baseEnv is the parent's environment without anything that configures the
// driver or names a superuser: each mode sets exactly what it means to.
func baseEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "TENANTPG_") || k == "DATABASE_URL" || k == envChildDSN {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func runMode(ctx context.Context, o options, w *world, mode string, smp *sampler, lw *logWatch, status io.Writer) (*modeResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	env, perReplica := modeEnv(mode, o)
	r := &modeResult{mode: mode, perReplica: perReplica, errs: map[string]int64{}, hist: map[int]int64{},
		opsByReplica: make([]int64, o.replicas)}

	r.loadBefore = loadAvg()
	spawned := time.Now()
	start := spawned.Add(o.lead)
	spec := childSpec{Replicas: o.replicas, Start: start.UnixNano(), Phase: o.phase, Duration: o.duration,
		OpTimeout: o.opTimeout, Workers: o.workers, ColdWorkers: o.coldWorkers, Workspaces: o.workspaces,
		Rows: o.rows, Seed: o.seed, ZipfS: o.zipfS}
	procs := o.replicas
	if mode == "single" || mode == "partitioned" {
		// One process runs every replica's workers: the same offered load.
		procs, spec.Virtual = 1, o.replicas
		spec.Partitioned = mode == "partitioned"
	}
	if mode == "fleet" {
		spec.ShareEvery, spec.ShareTarget = o.shareEvery, o.shareTarget()
	}
	// A replica that ignores its deadlines is killed: the run must end.
	mctx, cancel := context.WithDeadline(ctx, start.Add(o.duration+o.opTimeout+30*time.Second))
	defer cancel()

	var mu sync.Mutex // guards r's fields the readers fill and the kill
	var lines []line
	cmds := make([]*exec.Cmd, procs)
	var wg sync.WaitGroup
	for i := range cmds {
		spec.Replica = i
		arg, _ := json.Marshal(spec)
		cmd := exec.CommandContext(mctx, exe, childFlag, string(arg))
		cmd.Env = append(append(baseEnv(), env...),
			envChildDSN+"="+w.routedDSN+"&application_name=replica-"+strconv.Itoa(i))
		// The replicas die with the parent, whatever kills it.
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		cmd.Stderr = &prefixWriter{w: status, prefix: fmt.Sprintf("replica-%d: ", i)}
		out, err := cmd.StdoutPipe()
		if err == nil {
			err = cmd.Start()
		}
		if err != nil {
			cancel()
			wg.Wait()
			return nil, fmt.Errorf("start replica %d: %w", i, err)
		}
		cmds[i] = cmd
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sc := bufio.NewScanner(out)
			sc.Buffer(make([]byte, 64<<10), 16<<20)
			for sc.Scan() {
				var l line
				err := json.Unmarshal(sc.Bytes(), &l)
				mu.Lock()
				if err != nil {
					r.badLines++
				} else {
					lines = append(lines, l)
				}
				mu.Unlock()
			}
			err := cmd.Wait()
			mu.Lock()
			defer mu.Unlock()
			if err != nil && !(r.kill != nil && r.kill.victim == i) {
				r.exitErrs = append(r.exitErrs, fmt.Sprintf("replica-%d: %v", i, err))
			}
		}(i)
	}

	var killed time.Time
	if mode == "fleet" && o.kill {
		kr, at := killOne(mctx, o, start, smp, cmds, &mu, r)
		killed = at
		if kr != nil {
			fmt.Fprintf(status, "  killed replica-%d at %s (it held %d sessions)\n", kr.victim, kr.at.Round(time.Millisecond), kr.held)
		}
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// The backends of exited replicas end on their own; wait for that, so
	// that the next mode starts from an empty role and this one's refusals
	// and sessions are counted in its own window.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if sn := smp.latest(); sn.at.After(time.Now().Add(-time.Second)) && sn.total == 0 {
			break
		}
	}
	time.Sleep(2 * o.sampleEvery) // the log poller's last look
	end := time.Now()

	r.loadAfter = loadAvg()
	r.aggregate(o, lines)
	snaps := smp.between(spawned, end)
	r.samples = len(snaps)
	for _, sn := range snaps {
		r.peak = max(r.peak, sn.total)
		r.coordPeak = max(r.coordPeak, sn.coord)
	}
	r.refused, r.refusedLossy = lw.count(spawned, end)
	if r.kill != nil && r.kill.skipped == "" {
		r.kill.measure(smp.between(killed, end), killed)
	}
	return r, nil
}

// killOne waits until the middle of a phase in the middle of the run, picks
// the non-hot replica holding the most sessions, and SIGKILLs it.
func killOne(ctx context.Context, o options, start time.Time, smp *sampler, cmds []*exec.Cmd, mu *sync.Mutex, r *modeResult) (*killResult, time.Time) {
	kr := &killResult{victim: -1, goneAfter: -1, reuseAfter: -1}
	mu.Lock()
	r.kill = kr
	mu.Unlock()
	if o.replicas < 2 {
		kr.skipped = "one replica: no survivor"
		return nil, time.Time{}
	}
	at := (o.duration/2/o.phase)*o.phase + o.phase/2
	if at >= o.duration {
		at = o.duration / 2
	}
	select {
	case <-ctx.Done():
		kr.skipped = "the run ended first"
		return nil, time.Time{}
	case <-time.After(time.Until(start.Add(at))):
	}
	sn := smp.latest()
	hot := int((time.Since(start))/o.phase) % o.replicas
	mu.Lock()
	defer mu.Unlock()
	for i := range cmds {
		if n := sn.byApp[appName(i)]; i != hot && n > 0 && (kr.victim < 0 || n > kr.held) {
			kr.victim, kr.held = i, n
		}
	}
	if kr.victim < 0 {
		kr.skipped = "no non-hot replica held a session"
		return nil, time.Time{}
	}
	// The survivors' baseline is their most over the last second, not one
	// sample: their count moves all the time (dials refused and retried), and
	// exceeding a momentary dip would prove nothing about the victim's slots.
	now := time.Now()
	for _, past := range smp.between(now.Add(-time.Second), now) {
		kr.survivors = max(kr.survivors, survivorsOf(past, kr.victim))
	}
	if err := cmds[kr.victim].Process.Signal(syscall.SIGKILL); err != nil {
		kr.skipped = "kill: " + err.Error()
		return nil, time.Time{}
	}
	kr.at = now.Sub(start)
	return kr, now
}

// measure reads the snapshots after the kill.
func (k *killResult) measure(snaps []snapshot, killed time.Time) {
	for _, sn := range snaps {
		survivors := survivorsOf(sn, k.victim)
		if k.goneAfter < 0 && sn.byApp[appName(k.victim)] == 0 {
			k.goneAfter = sn.at.Sub(killed)
		}
		if k.reuseAfter < 0 && survivors > k.survivors {
			k.reuseAfter = sn.at.Sub(killed)
		}
	}
}

// survivorsOf counts the sessions of every replica but the victim.
func survivorsOf(sn snapshot, victim int) int {
	n := 0
	for app, c := range sn.byApp {
		if strings.HasPrefix(app, "replica-") && app != appName(victim) {
			n += c
		}
	}
	return n
}

func appName(i int) string { return "replica-" + strconv.Itoa(i) }

// aggregate sums the replicas' per-second lines.
func (r *modeResult) aggregate(o options, lines []line) {
	phases := int((o.duration + o.phase - 1) / o.phase)
	r.opsByPhase = make([]int64, phases)
	r.moves = make([][]move, o.replicas)
	r.reached = make([][]int, o.replicas)
	runSecs := int(o.duration / time.Second)
	rejected := make([]uint64, o.replicas) // cumulative in each line: keep the last
	dials := make([]uint64, o.replicas)
	yielded := make([]uint64, o.replicas)
	roundTrips := make([]uint64, o.replicas)
	for _, l := range lines {
		if l.Replica < 0 || l.Replica >= o.replicas {
			r.badLines++
			continue
		}
		r.moves[l.Replica] = append(r.moves[l.Replica], l.Moves...)
		r.reached[l.Replica] = append(r.reached[l.Replica], l.Reached...)
		r.cleared += l.Cleared
		rejected[l.Replica] = max(rejected[l.Replica], l.Rejected)
		dials[l.Replica] = max(dials[l.Replica], l.Dials)
		yielded[l.Replica] = max(yielded[l.Replica], l.Yielded)
		roundTrips[l.Replica] = max(roundTrips[l.Replica], l.RoundTrips)
		if l.Final {
			r.finals++
			r.dbs += l.DBs
			continue
		}
		r.lines++
		if r.timeline == nil {
			r.timeline = map[int][]line{}
		}
		r.timeline[l.Sec] = append(r.timeline[l.Sec], l)
		for k, n := range l.Errs {
			r.errs[k] += n
		}
		if r.firstErr == "" && l.FirstErr != "" {
			r.firstErr = l.FirstErr
		}
		// Reads that ended after the run (on their deadline) count as
		// errors above, not as throughput.
		if l.Sec < 0 || l.Sec >= runSecs {
			continue
		}
		r.ops += l.Ops
		r.opsByReplica[l.Replica] += l.Ops
		r.opsByPhase[int(time.Duration(l.Sec)*time.Second/o.phase)] += l.Ops
		for b, n := range l.Hist {
			r.hist[b] += n
		}
	}
	for i, n := range rejected {
		r.rejected += n
		r.dials += dials[i]
		r.yielded += yielded[i]
		r.roundTrips += roundTrips[i]
	}
}

// prefixWriter forwards a replica's stderr line by line, prefixed, with the
// password scrubbed in case some error ever carried it.
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
	buf    []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			return len(b), nil
		}
		fmt.Fprintln(p.w, p.prefix+strings.ReplaceAll(string(p.buf[:i]), password, "****"))
		p.buf = p.buf[i+1:]
	}
}

// loadAvg returns the 1, 5 and 15-minute load averages ("" where
// /proc/loadavg does not exist): the machine is shared, and every
// measurement carries them.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
