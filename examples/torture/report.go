package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/tenantpg/tenantpg"
)

// report is what a run found. failures lists what makes it fail.
type report struct {
	o        options
	elapsed  time.Duration // traffic
	setup    time.Duration // the server and the databases
	checks   time.Duration // from the end of traffic to the end of the checks
	baseline int           // goroutines before the run started anything

	ops      int64
	perFault [numFaults]faultRow
	errs     [numKinds]int64
	errTotal int64

	unexpected        int64
	unexpectedSamples []string
	samples           [numKinds][]string

	unanswered        int
	unansweredSamples []string

	peakOpen, sampledOpen     int
	serverPeak, serverSamples int
	quiet                     quiescence
	after                     closed
	final                     tenantpg.Stats
	goroutines                int // left above the baseline
	goroutineDump             string

	errorSecrets, logSecrets, statsSecrets int64
	secretWhere                            []string
	logLines, logWarns                     int

	killed, stormCallers, pinned, closedDBs, shrinks, hungAccepted, slowDials int64
	rejectedIn                                                                [numFaults]uint64
	restarts                                                                  []time.Duration
	harness                                                                   []string
	fatal                                                                     error
}

type faultRow struct {
	injected int64
	ops      int64
	errs     [numKinds]int64
}

// fill copies the counters into the report.
func (s *soak) fill(r *report) {
	t := &s.tally
	r.ops = t.total.Load()
	r.errTotal = t.errTotal.Load()
	r.unexpected = t.unexpected.Load()
	for f := faultQuiet; f < numFaults; f++ {
		row := &r.perFault[f]
		row.injected = s.notes.injected[f].Load()
		row.ops = t.ops[f].Load()
		for k := errKind(0); k < numKinds; k++ {
			row.errs[k] = t.errs[f][k].Load()
			r.errs[k] += row.errs[k]
		}
	}
	t.mu.Lock()
	r.unexpectedSamples = append([]string(nil), t.unexpectedSamples...)
	r.samples = t.samples
	t.mu.Unlock()

	_, r.peakOpen = s.realServer(r.final)
	r.sampledOpen = int(s.sampledOpen.Load())

	r.errorSecrets = t.secretHits.Load()
	r.statsSecrets = s.statsHits.Load()
	s.logs.mu.Lock()
	r.logSecrets, r.logLines, r.logWarns = int64(s.logs.hits), s.logs.lines, s.logs.warns
	s.logs.mu.Unlock()
	for _, w := range []struct {
		n    int64
		name string
	}{{r.errorSecrets, "errors"}, {r.logSecrets, "logs"}, {r.statsSecrets, "stats"}} {
		if w.n > 0 {
			r.secretWhere = append(r.secretWhere, w.name)
		}
	}

	n := &s.notes
	r.killed, r.stormCallers, r.pinned = n.killed.Load(), n.stormCallers.Load(), n.pinned.Load()
	r.closedDBs, r.shrinks, r.hungAccepted, r.slowDials = n.closedDBs.Load(), n.shrinks.Load(), n.hungAccepted.Load(), n.slowDials.Load()
	n.mu.Lock()
	r.restarts = append([]time.Duration(nil), n.restarts...)
	r.rejectedIn = n.rejectedIn
	r.harness = append([]string(nil), n.harness...)
	r.fatal = n.fatal
	n.mu.Unlock()
}

// failures lists every finding that makes the run fail: a leak, an
// unexpected error, the server seeing more than the budget, a password
// where it does not belong.
func (r *report) failures() []string {
	var f []string
	add := func(bad bool, format string, args ...any) {
		if bad {
			f = append(f, fmt.Sprintf(format, args...))
		}
	}
	b := r.o.budget
	add(r.fatal != nil, "the harness failed: %v", r.fatal)
	add(r.ops == 0, "no operation ran")
	add(r.unexpected > 0, "%d unexpected errors", r.unexpected)
	add(r.unanswered > 0, "%d workspaces did not answer after the run", r.unanswered)
	add(r.peakOpen > b || r.sampledOpen > b, "the driver held %d tokens (sampled %d), over the budget of %d", r.peakOpen, r.sampledOpen, b)
	add(r.serverPeak > b, "the server saw %d backends for the role, over the budget of %d", r.serverPeak, b)
	add(r.rejectedIn[faultQuiet] > 0, "the server refused %d dials with 53300 in quiet periods, with the role's limit at the budget", r.rejectedIn[faultQuiet])
	add(!r.quiet.ok, "not quiescent: tokens %d, driver connections %d, server backends %d (dialing %d, closing %d, waiting %d, server error %v)",
		r.quiet.tokens, r.quiet.driverConns, r.quiet.server, r.quiet.dialing, r.quiet.closing, r.quiet.waiting, r.quiet.serverErr)
	add(!r.after.ok, "after closing everything: tokens %d, waiting %d, server backends %d (server error %v)",
		r.after.tokens, r.after.waiting, r.after.server, r.after.serverErr)
	add(r.goroutines > 0, "%d goroutines leaked", r.goroutines)
	add(len(r.secretWhere) > 0, "the password appeared in %s", strings.Join(r.secretWhere, ", "))
	return f
}

func okMark(bad bool) string {
	if bad {
		return "**FAIL**"
	}
	return "ok"
}

// print writes the report as markdown.
func (r *report) print(w io.Writer) {
	o := r.o
	fmt.Fprintf(w, "\n## tenantpg torture: %s, %d workspaces, %d workers, budget %d (%d per database), a fault every %s, seed %d\n\n",
		r.elapsed.Round(100*time.Millisecond), o.workspaces, o.workers, o.budget, o.perDB, o.faultEvery, o.seed)

	fmt.Fprint(w, "| fault | injected | ops during | errors |")
	for k := errKind(0); k < numKinds; k++ {
		fmt.Fprintf(w, " %s |", kindNames[k])
	}
	fmt.Fprint(w, "\n|---|--:|--:|--:|")
	fmt.Fprint(w, strings.Repeat("--:|", int(numKinds)))
	fmt.Fprintln(w)
	var injected int64
	for f := faultQuiet; f < numFaults; f++ {
		row := r.perFault[f]
		name, inj := faultNames[f], fmt.Sprint(row.injected)
		if f == faultQuiet {
			name, inj = "none (quiet)", "–"
		} else if row.injected == 0 {
			continue
		}
		injected += row.injected
		var errs int64
		for _, n := range row.errs {
			errs += n
		}
		fmt.Fprintf(w, "| %s | %s | %d | %d |", name, inj, row.ops, errs)
		for _, n := range row.errs {
			fmt.Fprintf(w, " %d |", n)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "| **total** | %d | %d | %d |", injected, r.ops, r.errTotal)
	for _, n := range r.errs {
		fmt.Fprintf(w, " %d |", n)
	}
	fmt.Fprintln(w)

	active, _ := o.schedule()
	fmt.Fprintln(w)
	for f := faultQuiet + 1; f < numFaults; f++ {
		n := r.perFault[f].injected
		if n == 0 {
			continue
		}
		fmt.Fprintf(w, "- %s: ", faultNames[f])
		switch f {
		case faultKill:
			fmt.Fprintf(w, "%d backends terminated with pg_terminate_backend", r.killed)
		case faultRestart:
			fmt.Fprintf(w, "%d restarts, each taking%s", len(r.restarts), durations(r.restarts))
		case faultLimit:
			fmt.Fprintf(w, "role CONNECTION LIMIT %d under a budget of %d: %d dials refused with 53300 (%.0f per second of lowered limit), retried by the driver",
				max(1, o.budget/2), o.budget, r.rejectedIn[f], float64(r.rejectedIn[f])/(float64(n)*active.Seconds()))
		case faultHung:
			fmt.Fprintf(w, "%d connections accepted by the hung host, %d dials delayed 300ms by the proxy", r.hungAccepted, r.slowDials)
		case faultStorm:
			fmt.Fprintf(w, "%d callers in bursts of %d, with %d connections pinned", r.stormCallers, o.storm, r.pinned)
		case faultMisuse:
			fmt.Fprintf(w, "%d *sql.DB closed under running queries, %d budget shrinks to 2 and back, a *sql.Conn held through each", r.closedDBs, r.shrinks)
		}
		fmt.Fprintln(w)
	}

	var refusals []string
	for f := faultQuiet; f < numFaults; f++ {
		if n := r.rejectedIn[f]; n > 0 {
			refusals = append(refusals, fmt.Sprintf("%s %d", faultNames[f], n))
		}
	}
	if len(refusals) > 0 {
		fmt.Fprintf(w, "\nDials the server refused with 53300, by the phase they happened in (the driver retries them): %s.\n", strings.Join(refusals, ", "))
	}

	b := o.budget
	fmt.Fprint(w, "\n| check | found | expected | |\n|---|---|---|---|\n")
	fmt.Fprintf(w, "| operations (storm callers among them) | %d (%d) in %s, %.0f/s | > 0 | %s |\n", r.ops, r.stormCallers,
		r.elapsed.Round(100*time.Millisecond), float64(r.ops)/r.elapsed.Seconds(), okMark(r.ops == 0))
	fmt.Fprintf(w, "| unexpected errors (quiet periods, or of no known kind) | %d | 0 | %s |\n", r.unexpected, okMark(r.unexpected > 0))
	fmt.Fprintf(w, "| workspaces not answering after the run | %d of %d | 0 | %s |\n", r.unanswered, o.workspaces, okMark(r.unanswered > 0))
	fmt.Fprintf(w, "| max tokens to the server (direct + proxy): PeakOpen / sampled Open | %d / %d | ≤ %d | %s |\n", r.peakOpen, r.sampledOpen, b,
		okMark(r.peakOpen > b || r.sampledOpen > b))
	fmt.Fprintf(w, "| server-side peak of the role's backends (%d samples) | %d | ≤ %d | %s |\n", r.serverSamples, r.serverPeak, b, okMark(r.serverPeak > b))
	fmt.Fprintf(w, "| dials refused with 53300 in quiet periods (the role's limit is the budget then) | %d | 0 | %s |\n",
		r.rejectedIn[faultQuiet], okMark(r.rejectedIn[faultQuiet] > 0))
	q := r.quiet
	fmt.Fprintf(w, "| at quiescence: tokens / driver's connections / server backends | %d / %d / %d (idle %d, in use %d, after %s) | equal | %s |\n",
		q.tokens, q.driverConns, q.server, q.idle, q.inUse, q.waited.Round(10*time.Millisecond), okMark(!q.ok))
	fmt.Fprintf(w, "| waiters left at quiescence | %d | 0 | %s |\n", q.waiting, okMark(q.waiting > 0))
	fmt.Fprintf(w, "| after closing every DB and the driver: tokens / server backends | %d / %d | 0 / 0 | %s |\n",
		r.after.tokens, r.after.server, okMark(!r.after.ok))
	fmt.Fprintf(w, "| goroutines left above the baseline (%d) | %d | 0 | %s |\n", r.baseline, r.goroutines, okMark(r.goroutines > 0))
	fmt.Fprintf(w, "| password in errors / log lines (%d) / stats JSON | %d / %d / %d | 0 | %s |\n",
		r.logLines, r.errorSecrets, r.logSecrets, r.statsSecrets, okMark(len(r.secretWhere) > 0))

	st := r.final
	fmt.Fprintf(w, "\nSetup (server, role, %d databases) took %s; the checks after traffic %s (recovery margin, every workspace queried, quiescence, close, goroutine settle).\n",
		o.workspaces, r.setup.Round(100*time.Millisecond), r.checks.Round(100*time.Millisecond))
	fmt.Fprintf(w, "Driver: %d dials, %d waits (%s in all), %d timeouts, dial errors %s, evictions %s; %d log lines (%d warnings).\n",
		st.Dials, st.WaitCount, st.WaitDuration.Round(time.Millisecond), st.Timeouts, counts(st.DialErrors), counts(st.Evictions), r.logLines, r.logWarns)
	var circuits []string
	for _, sv := range st.Servers {
		circuits = append(circuits, fmt.Sprintf("%s %d outages, %d waits ended while down", sv.Server, sv.Outages, sv.Failed))
	}
	fmt.Fprintf(w, "Circuits (the server, the slow proxy, the hung host and the refusing port each have one): %s.\n", strings.Join(circuits, "; "))

	if r.fatal != nil {
		fmt.Fprintf(w, "\n**The harness failed:** %v\n", r.fatal)
	}
	if len(r.harness) > 0 {
		fmt.Fprintf(w, "\nHarness errors (admin queries, not the driver):\n")
		for _, h := range r.harness {
			fmt.Fprintf(w, "- %s\n", h)
		}
	}
	if len(r.unexpectedSamples) > 0 {
		fmt.Fprintf(w, "\nUnexpected errors (first %d):\n", len(r.unexpectedSamples))
		for _, s := range r.unexpectedSamples {
			fmt.Fprintf(w, "- %s\n", s)
		}
	}
	if len(r.unansweredSamples) > 0 {
		fmt.Fprintf(w, "\nWorkspaces that did not answer:\n")
		for _, s := range r.unansweredSamples {
			fmt.Fprintf(w, "- %s\n", s)
		}
	}
	fmt.Fprintf(w, "\nError samples by kind:\n")
	for k := errKind(0); k < numKinds; k++ {
		for _, s := range r.samples[k] {
			fmt.Fprintf(w, "- %s: %s\n", kindNames[k], s)
		}
	}
	if fails := r.failures(); len(fails) > 0 {
		fmt.Fprintf(w, "\n**FAIL**: %s\n", strings.Join(fails, "; "))
	} else {
		fmt.Fprintf(w, "\nPASS\n")
	}
}

func durations(ds []time.Duration) string {
	var s []string
	for _, d := range ds {
		s = append(s, d.Round(10*time.Millisecond).String())
	}
	if len(s) > 8 {
		s = append(s[:8], "…")
	}
	return " " + strings.Join(s, ", ")
}

func counts(m map[string]uint64) string {
	keys := make([]string, 0, len(m))
	for k, v := range m {
		if v > 0 {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return "none"
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, m[k])
	}
	return strings.Join(parts, ", ")
}
