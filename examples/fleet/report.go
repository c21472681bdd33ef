package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

type report struct {
	o        options
	external bool
	modes    []*modeResult
}

// killTarget is issue #12's bound on the time from a replica's death until
// its slots serve the others.
const killTarget = 2 * time.Second

func (rep *report) mode(label string) *modeResult {
	for _, m := range rep.modes {
		if m.label == label {
			return m
		}
	}
	return nil
}

// meanOps is the mean ops/s of the runs of a mode, by its label in -modes
// (0 if none ran).
func (rep *report) meanOps(label string) float64 {
	var sum float64
	n := 0
	for _, m := range rep.modes {
		if m.label == label {
			sum += rep.opsPerSec(m)
			n++
		}
	}
	if n == 0 {
		return 0
	}
	return sum / float64(n)
}

// repeatNote says when the ratios are of means.
func (rep *report) repeatNote() string {
	seen := map[string]bool{}
	for _, m := range rep.modes {
		if seen[m.label] {
			return "; means over the repeated modes"
		}
		seen[m.label] = true
	}
	return ""
}

// problems are what makes the run itself unusable (not a target missed):
// a replica that failed, reported nothing or printed garbage.
func (rep *report) problems() []string {
	var out []string
	for _, m := range rep.modes {
		for _, e := range m.exitErrs {
			out = append(out, m.label+": "+e)
		}
		expected := rep.o.replicas
		if m.kill != nil && m.kill.skipped == "" {
			expected-- // the victim never prints its final line
		}
		if m.finals != expected || m.badLines > 0 || m.lines == 0 {
			out = append(out, fmt.Sprintf("%s: %d of %d replicas finished, %d per-second lines, %d unparsable",
				m.label, m.finals, expected, m.lines, m.badLines))
		}
	}
	return out
}

func percentile(hist map[int]int64, q float64) float64 {
	var total int64
	for _, n := range hist {
		total += n
	}
	if total == 0 {
		return 0
	}
	rank := int64(q * float64(total))
	var seen int64
	for _, b := range slices.Sorted(maps.Keys(hist)) {
		if seen += hist[b]; seen > rank {
			return ms(bucketValue(b))
		}
	}
	return 0
}

func (m *modeResult) errorCount() int64 {
	var n int64
	for _, v := range m.errs {
		n += v
	}
	return n
}

func (m *modeResult) errorText() string {
	if len(m.errs) == 0 {
		return "0"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m.errs)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m.errs[k]))
	}
	return fmt.Sprintf("%d (%s)", m.errorCount(), strings.Join(parts, ", "))
}

func (rep *report) opsPerSec(m *modeResult) float64 {
	return float64(m.ops) / rep.o.duration.Seconds()
}

func (rep *report) refusedText(m *modeResult) string {
	switch {
	case rep.external:
		return "n/a (not our server)"
	case m.refusedLossy:
		return fmt.Sprintf("≥ %d", m.refused)
	}
	return fmt.Sprint(m.refused)
}

func (k *killResult) text() string {
	switch {
	case k == nil:
		return "–"
	case k.skipped != "":
		return "not killed: " + k.skipped
	}
	verdict := "met"
	if k.reuseAfter < 0 || k.reuseAfter > killTarget {
		verdict = "not met"
	}
	return fmt.Sprintf("%s (replica-%d held %d, gone after %s; survivors > %d; target ≤ %s %s)",
		dur(k.reuseAfter), k.victim, k.held, dur(k.goneAfter), k.survivors, killTarget, verdict)
}

func dur(d time.Duration) string {
	if d < 0 {
		return "never"
	}
	return d.Round(time.Millisecond).String()
}

func (rep *report) write(w io.Writer) {
	o := rep.o
	fmt.Fprintf(w, "\n## Fleet budget F=%d: %d replicas × %d workers (%d while not hot), W=%d Zipf s=%.2f, phase %s, %s per mode\n\n",
		o.fleetBudget, o.replicas, o.workers, o.coldWorkers, o.workspaces, o.zipfS, o.phase, o.duration)
	fmt.Fprintln(w, "| mode | budget per replica | ops/s | dials/s | p50 ms | p99 ms | caller errors | server peak (role) | coordination sessions | 53300 in server log | drivers' refused dials | kill -9 → slots reused |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
	for _, m := range rep.modes {
		fmt.Fprintf(w, "| %s | %d | %.0f | %.0f | %.2f | %.2f | %s | %d / %d | %d | %s | %d | %s |\n",
			m.label, m.perReplica, rep.opsPerSec(m), float64(m.dials)/o.duration.Seconds(), percentile(m.hist, 0.5), percentile(m.hist, 0.99),
			m.errorText(), m.peak, m.roleLimit(), m.coordPeak, rep.refusedText(m), m.rejected, m.kill.text())
	}

	// Per phase: the hot replica moves, and a budget that follows it keeps
	// the throughput flat.
	phases := len(rep.modes[0].opsByPhase)
	fmt.Fprintf(w, "\nops/s by phase (hot replica):\n\n| mode |")
	for p := 0; p < phases; p++ {
		fmt.Fprintf(w, " %d (r%d) |", p, p%o.replicas)
	}
	fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---:|", phases))
	for _, m := range rep.modes {
		fmt.Fprintf(w, "| %s |", m.label)
		for p, n := range m.opsByPhase {
			length := min(o.phase, o.duration-time.Duration(p)*o.phase)
			fmt.Fprintf(w, " %.0f |", float64(n)/length.Seconds())
		}
		fmt.Fprintln(w)
	}

	if o.timeline {
		rep.writeTimeline(w)
	}

	for _, m := range rep.modes {
		if m.mode == "fleet" && o.shareEvery > 0 {
			rep.writeMoves(w, m, rep.o)
		}
	}

	fmt.Fprintln(w, "\nSummary:")
	// A mode listed more than once (-modes fleet,single,fleet,single, to
	// alternate them on a shared machine) counts with its mean.
	ratio := func(a, b, target string) {
		if x, y := rep.meanOps(a), rep.meanOps(b); x > 0 && y > 0 && a != b {
			fmt.Fprintf(w, "- %s/%s %.2f×%s (ops/s%s)\n", a, b, x/y, target, rep.repeatNote())
		}
	}
	var labels []string // each label once, in order
	for _, m := range rep.modes {
		if !slices.Contains(labels, m.label) {
			labels = append(labels, m.label)
		}
	}
	for _, l := range labels {
		if kind, _, _ := parseMode(l, 0); kind == "fleet" {
			ratio(l, "single", " (target ≥ 0.9×)")
			ratio(l, "static", " (target ≥ 1.5×)")
			ratio(l, "partitioned", "")
			ratio(l, "uncoordinated", "")
		}
	}
	for _, l := range labels {
		if kind, _, _ := parseMode(l, 0); kind == "single" && l != "single" {
			ratio(l, "single", "")
		}
	}
	ratio("partitioned", "single", "")
	ratio("single", "static", "")
	for _, m := range rep.modes {
		fmt.Fprintf(w, "- %s: %.0f ops/s, %s caller errors, the role peaked at %d of %d sessions, %s refusals in the server log",
			m.label, rep.opsPerSec(m), m.errorText(), m.peak, m.roleLimit(), rep.refusedText(m))
		if m.yielded > 0 {
			fmt.Fprintf(w, ", %d backends closed for another replica", m.yielded)
		}
		if m.roundTrips > 0 {
			fmt.Fprintf(w, ", %.1f coordination statements/s", float64(m.roundTrips)/o.duration.Seconds())
		}
		if m.loadBefore != "" {
			fmt.Fprintf(w, "; load average %s before, %s after", m.loadBefore, m.loadAfter)
		}
		if m.firstErr != "" {
			fmt.Fprintf(w, "; first error: %s", strings.ReplaceAll(m.firstErr, password, "****"))
		}
		fmt.Fprintln(w, ".")
	}
	if fleet := rep.mode("fleet"); fleet != nil && fleet.coordPeak == 0 {
		fmt.Fprintf(w, "- fleet: no session of the role in the coordination database %q: this build of the library "+
			"ignores TENANTPG_FLEET_*, so fleet mode ran as uncoordinated.\n", fleetDatabase())
	}
	for _, p := range rep.problems() {
		fmt.Fprintln(w, "- PROBLEM:", p)
	}
}

// lockedWriter serialises the replicas' forwarded stderr and the parent's
// own status lines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// writeTimeline prints, per mode and second, each replica's reads,
// connections held, fleet share and callers waiting: where a budget that
// should follow the load lags behind it.
func (rep *report) writeTimeline(w io.Writer) {
	o := rep.o
	for _, m := range rep.modes {
		fmt.Fprintf(w, "\n%s, per second: ops/open/share/waiting, dials started/dialing/closing/dial slots/dial ms, p50/p99 ms by replica (* hot; the driver's state in single and partitioned is r0's)\n\n| s |", m.label)
		for i := 0; i < o.replicas; i++ {
			fmt.Fprintf(w, " r%d |", i)
		}
		fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---|", o.replicas))
		secs := make([]int, 0, len(m.timeline))
		for s := range m.timeline {
			secs = append(secs, s)
		}
		slices.Sort(secs)
		for _, s := range secs {
			cells := make([]string, o.replicas)
			for _, l := range m.timeline[s] {
				hot := ""
				if l.Hot {
					hot = "*"
				}
				cells[l.Replica] = fmt.Sprintf("%s%d/%d/%d/%d, %d/%d/%d/%d/%.1f, %.1f/%.0f", hot, l.Ops, l.Open, l.Share, l.Waiting,
					l.DialsIn, l.Dialing, l.Closing, l.DialSlots, l.DialMs, l.P50, l.P99)
			}
			fmt.Fprintf(w, "| %d | %s |\n", s, strings.Join(cells, " | "))
		}
	}
}

// writeMoves reports how fast the fleet's share moves (see sampleShare):
// every move, the first of each hot phase but the first phase (the move of
// the load from the previous hot replica), and how long after its phase
// starts the hot replica's share reaches the target.
func (rep *report) writeMoves(w io.Writer, m *modeResult, o options) {
	o.fleetBudget = m.budget
	phaseMS := int(o.phase / time.Millisecond)
	var all, first, reach []float64
	never := 0
	for r, moves := range m.moves {
		for _, mv := range moves {
			all = append(all, float64(mv.L-mv.Q))
		}
		for p := 1; p*phaseMS < int(o.duration/time.Millisecond); p++ {
			if p%o.replicas != r {
				continue
			}
			lo, hi := p*phaseMS, (p+1)*phaseMS
			best := -1
			for i, mv := range moves {
				if mv.Q >= lo && mv.Q < hi && (best < 0 || mv.Q < moves[best].Q) {
					best = i
				}
			}
			if best >= 0 {
				first = append(first, float64(moves[best].L-moves[best].Q))
			}
			got := false
			for _, at := range m.reached[r] {
				if at >= lo && at < hi {
					reach = append(reach, float64(at-lo))
					got = true
					break
				}
			}
			if !got {
				never++
			}
		}
	}
	fmt.Fprintf(w, "\nShare moves (%s; Stats sampled every %s in each replica; from a caller queued at the limit to a newly leased slot):\n\n", m.label, o.shareEvery)
	fmt.Fprintln(w, "| moves | n | p50 ms | p99 ms | max ms |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|")
	row := func(name string, v []float64) {
		if len(v) == 0 {
			fmt.Fprintf(w, "| %s | 0 | – | – | – |\n", name)
			return
		}
		slices.Sort(v)
		fmt.Fprintf(w, "| %s | %d | %.0f | %.0f | %.0f |\n", name, len(v), rank(v, 0.5), rank(v, 0.99), v[len(v)-1])
	}
	row("every move", all)
	row("first move of each hot phase after the first", first)
	row(fmt.Sprintf("phase start → hot share ≥ %d", o.shareTarget()), reach)
	fmt.Fprintf(w, "\n%d queues emptied without a lease; %d hot phases after the first never reached a share of %d.\n", m.cleared, never, o.shareTarget())
}

// rank is the nearest-rank quantile of sorted v.
func rank(v []float64, q float64) float64 {
	i := int(q*float64(len(v))+0.999999) - 1
	return v[min(max(i, 0), len(v)-1)]
}

// roleLimit is the role's CONNECTION LIMIT during the mode: its budget,
// except in modes single and partitioned, which leave it as it was (F or the last mode@B's).
func (m *modeResult) roleLimit() int { return m.connLimit }
