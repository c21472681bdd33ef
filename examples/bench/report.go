package main

import (
	"cmp"
	"encoding/csv"
	"fmt"
	"image/color"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// writeTable prints the setup, the comparison table and the cache
// simulations as markdown, to be pasted into BENCHMARKS.md as is.
func writeTable(out io.Writer, rep *report) {
	o := rep.opts
	switch {
	case o.simOnly:
		fmt.Fprintf(out, "Cache models only, without a server: C = %d workers, traces of %d operations from seed %d.\n",
			o.workers, (o.traceOps+o.workers-1)/o.workers*o.workers, o.seed)
	case o.setupOnly:
		fmt.Fprintf(out, "PostgreSQL %s, template database with a %d-row kv table.\n\n", rep.server, o.rows)
	default:
		fmt.Fprintf(out, "PostgreSQL %s, PgBouncer: %s. Budget B = %d (the app role's CONNECTION LIMIT; every contender's cap), "+
			"C = %d workers, %s, %d-row kv table per workspace, %s measured per contender after %s of warm-up, "+
			"operation deadline %s, tenantpg AcquireTimeout %s; traces of %d operations from seed %d.\n\n",
			rep.server, rep.pgbouncer, o.budget, o.workers, writeMix(o.writes), o.rows, o.duration, o.warmup,
			o.opTimeout, o.acquireTimeout, (o.traceOps+o.workers-1)/o.workers*o.workers, o.seed)
	}
	if len(o.serverSet) > 0 {
		fmt.Fprintf(out, "Server settings beyond the harness's: %s.\n\n", strings.Join(o.serverSet, ", "))
	}
	for _, c := range rep.creations {
		if c.created > 0 {
			fmt.Fprintf(out, "Creating %d workspace databases (up to W = %d) took %s (%.1f per second).\n",
				c.created, c.total, c.took.Round(100*time.Millisecond), float64(c.created)/math.Max(c.took.Seconds(), 1e-9))
			if c.warmed > 0 {
				fmt.Fprintf(out, "A first session to each of them, 4 at a time, before any contender: %s (%.1f per second).\n",
					c.warmed.Round(100*time.Millisecond), float64(c.created)/math.Max(c.warmed.Seconds(), 1e-9))
			}
		}
	}
	if len(rep.results) > 0 {
		writeResults(out, rep)
	}

	if len(rep.sims) == 0 {
		return
	}
	var ks []int
	for _, s := range rep.sims {
		if !slices.Contains(ks, s.k) {
			ks = append(ks, s.k)
		}
	}
	fmt.Fprintln(out)
	fmt.Fprintln(out, "Cache models on the same traces (interleaved one operation per worker): the share of operations whose workspace already held one of K slots.")
	fmt.Fprintln(out)
	head := "| W | dist | trace ops |"
	sep := "|---:|---|---:|"
	for _, k := range ks {
		for _, p := range simPolicies {
			head += fmt.Sprintf(" %s K=%d |", p.title, k)
			sep += "---:|"
		}
	}
	fmt.Fprintln(out, head+" tenantpg measured |")
	fmt.Fprintln(out, sep+"---:|")
	type cell struct {
		w    int
		dist string
	}
	var cells []cell
	for _, s := range rep.sims {
		if c := (cell{s.workspaces, s.dist}); !slices.Contains(cells, c) {
			cells = append(cells, c)
		}
	}
	for _, c := range cells {
		row := fmt.Sprintf("| %d | %s |", c.w, c.dist)
		first := true
		for _, k := range ks {
			for _, p := range simPolicies {
				policy := p.name
				for _, s := range rep.sims {
					if s.workspaces == c.w && s.dist == c.dist && s.k == k && s.policy == policy {
						if first {
							row += fmt.Sprintf(" %d |", s.ops)
							first = false
						}
						row += " " + pct(s.hitRate) + " |"
					}
				}
			}
		}
		measured := math.NaN()
		for _, r := range rep.results {
			if r.workspaces == c.w && r.dist == c.dist && r.contender == "tenantpg" {
				measured = r.hitRate
			}
		}
		fmt.Fprintln(out, row+" "+pct(measured)+" |")
	}
	if len(rep.results) == 0 {
		return // the legend below explains the contenders' table
	}
	fmt.Fprintln(out)
	fmt.Fprintln(out, "ok ops/s: successful operations per second, counting every operation that ended after the warm-up, over the time from the warm-up's end "+
		"until the last one ended (a slow operation that ends after the window still counts, with its latency or its error); latencies are of successful operations. "+
		"53300: connections the server refused (too many connections for the role); exhausted: the contender's own limit "+
		"(tenantpg's ErrBudgetExhausted, the seed's connection-limit error); deadline: the operation's deadline passed; "+
		"stuck: workers whose operation was still running "+stuckGrace.String()+" after its deadline, abandoned (a contender that ignores its context). "+
		"new server conns: sessions the server established during the run, warm-up included (pg_stat_database.sessions); "+
		"conn reuse: 1 - new server conns / successful operations; server peak: most app-role backends pg_stat_activity showed at once. "+
		"tenantpg hit rate: 1 - the driver's dials / successful operations, warm-up included.")
	for _, r := range rep.results {
		if r.note != "" && r.status == "" {
			fmt.Fprintf(out, "\n- W=%d %s %s: %s", r.workspaces, r.dist, r.contender, r.note)
		}
	}
	fmt.Fprintln(out)
}

func writeMix(w float64) string {
	if w == 0 {
		return "primary-key reads only"
	}
	return fmt.Sprintf("primary-key reads with %.0f%% updates", w*100)
}

func pct(f float64) string {
	if math.IsNaN(f) {
		return ""
	}
	return fmt.Sprintf("%.1f%%", 100*f)
}

func countOrNA(n int64) string {
	if n < 0 {
		return "n/a"
	}
	return strconv.FormatInt(n, 10)
}

// csvHeader is the CSV's first row. Rows of kind "run" are contenders'
// results, rows of kind "sim" the cache models (only hit_rate and cache_k
// are set).
var csvHeader = []string{"kind", "workspaces", "dist", "contender", "status", "ops", "ops_per_s", "errors",
	"err_53300", "err_exhausted", "err_deadline", "err_stuck", "err_other", "p50_ms", "p99_ms", "p999_ms",
	"server_conns", "conn_reuse", "server_peak", "budget", "dials", "hit_rate", "cache_k", "window_s", "note"}

func writeCSV(path string, rep *report) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("csv: %w", err)
	}
	cw := csv.NewWriter(f)
	_ = cw.Write(csvHeader)
	num := func(f float64) string {
		if math.IsNaN(f) {
			return ""
		}
		return strconv.FormatFloat(f, 'f', -1, 64)
	}
	itoa := func(n int64) string { return strconv.FormatInt(n, 10) }
	for _, r := range rep.results {
		row := []string{"run", strconv.Itoa(r.workspaces), r.dist, r.contender, r.status}
		if r.status != "" {
			row = append(row, make([]string, len(csvHeader)-len(row))...)
			_ = cw.Write(row)
			continue
		}
		m := r.m
		dials := ""
		if r.dials >= 0 {
			dials = itoa(r.dials)
		}
		conns := ""
		if r.serverConns >= 0 {
			conns = itoa(r.serverConns)
		}
		row = append(row, itoa(m.ops), num(r.opsPerSec), itoa(m.errors()),
			itoa(m.errs[errTooMany]), itoa(m.errs[errExhausted]), itoa(m.errs[errDeadline]), itoa(m.errs[errStuck]), itoa(m.errs[errOther]),
			num(ms(r.p50)), num(ms(r.p99)), num(ms(r.p999)), conns, num(r.reuse), strconv.Itoa(r.peak),
			strconv.Itoa(r.budget), dials, num(r.hitRate), "", num(m.window.Seconds()), r.note)
		_ = cw.Write(row)
	}
	for _, s := range rep.sims {
		row := []string{"sim", strconv.Itoa(s.workspaces), s.dist, s.policy, "", strconv.Itoa(s.ops)}
		row = append(row, make([]string, len(csvHeader)-len(row))...)
		row[slices.Index(csvHeader, "hit_rate")] = num(s.hitRate)
		row[slices.Index(csvHeader, "cache_k")] = strconv.Itoa(s.k)
		row[slices.Index(csvHeader, "budget")] = strconv.Itoa(rep.opts.budget)
		_ = cw.Write(row)
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		f.Close()
		return fmt.Errorf("csv: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("csv: %w", err)
	}
	return nil
}

// writePNG draws one row of two panels per distribution: successful
// operations per second and p99 latency against the number of workspaces,
// one line per contender.
func writePNG(path string, rep *report) error {
	dists := rep.opts.dists
	var names []string
	var sizes []int
	for _, r := range rep.results {
		if r.status == "" && !slices.Contains(names, r.contender) {
			names = append(names, r.contender)
		}
		if !slices.Contains(sizes, r.workspaces) {
			sizes = append(sizes, r.workspaces)
		}
	}
	logX := len(sizes) > 1
	rows := make([][]*plot.Plot, len(dists))
	for i, dist := range dists {
		tput := newPanel(fmt.Sprintf("throughput, %s", distTitle(dist)), "successful operations/s (log)", logX)
		lat := newPanel(fmt.Sprintf("p99 latency, %s", distTitle(dist)), "p99 latency, ms (log)", logX)
		for ci, name := range names {
			var tp, lp plotter.XYs
			for _, r := range rep.results {
				// Both axes are logarithmic, as contenders differ by orders
				// of magnitude; a contender with no successful operation
				// has no point.
				if r.contender == name && r.dist == dist && r.status == "" && r.opsPerSec > 0 {
					// Each contender's points sit slightly to one side, so
					// that equal values do not hide each other.
					x := float64(r.workspaces) * (1 + 0.01*(float64(ci)-float64(len(names)-1)/2))
					tp = append(tp, plotter.XY{X: x, Y: r.opsPerSec})
					lp = append(lp, plotter.XY{X: x, Y: max(ms(r.p99), 0.001)})
				}
			}
			slices.SortFunc(tp, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
			slices.SortFunc(lp, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
			if err := addSeries(tput, name, ci, tp); err != nil {
				return err
			}
			if err := addSeries(lat, name, ci, lp); err != nil {
				return err
			}
		}
		for _, p := range []*plot.Plot{tput, lat} {
			if len(sizes) == 1 {
				// One workspace count: a window around it, in which the
				// contenders' sideways offsets stay small.
				p.X.Min, p.X.Max = float64(sizes[0])*0.85, float64(sizes[0])*1.15
			}
			if p.Y.Min > 0 && !math.IsInf(p.Y.Min, 0) {
				p.Y.Scale = plot.LogScale{}
				p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
				// Room above the highest point for the legend.
				p.Y.Max *= 20
				p.Y.Min /= 2
			}
		}
		rows[i] = []*plot.Plot{tput, lat}
	}
	const width, rowHeight = 12 * vg.Inch, 4.5 * vg.Inch
	img := vgimg.New(width, rowHeight*vg.Length(len(dists)))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: len(dists), Cols: 2, PadX: vg.Inch / 3, PadY: vg.Inch / 3,
		PadTop: vg.Inch / 6, PadBottom: vg.Inch / 6, PadLeft: vg.Inch / 6, PadRight: vg.Inch / 6}
	canvases := plot.Align(rows, tiles, dc)
	for i := range rows {
		for j := range rows[i] {
			rows[i][j].Draw(canvases[i][j])
		}
	}
	return savePNG(path, img)
}

// savePNG writes img to path as a PNG.
func savePNG(path string, img *vgimg.Canvas) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("png: %w", err)
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("png: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("png: %w", err)
	}
	return nil
}

func distTitle(d string) string {
	switch d {
	case distRoundRobin:
		return "round-robin"
	case distNoisy:
		return "uniform with a noisy neighbour"
	case distQuiet:
		return "uniform, no neighbour"
	}
	return "Zipf s = 1.1"
}

func newPanel(title, ylabel string, logX bool) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "workspace databases (W)"
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	if logX {
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	return p
}

var palette = []color.Color{
	color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	color.RGBA{R: 0x94, G: 0x67, B: 0xbd, A: 0xff},
	color.RGBA{R: 0x8c, G: 0x56, B: 0x4b, A: 0xff},
}

func addSeries(p *plot.Plot, name string, i int, xys plotter.XYs) error {
	if len(xys) == 0 {
		return nil
	}
	l, s, err := plotter.NewLinePoints(xys)
	if err != nil {
		return fmt.Errorf("png: %s: %w", name, err)
	}
	c := palette[i%len(palette)]
	l.Color, s.Color = c, c
	l.Width = vg.Points(1.5)
	s.Shape = draw.CircleGlyph{}
	s.Radius = vg.Points(3)
	p.Add(l, s)
	p.Legend.Add(strings.TrimSpace(name), l, s)
	return nil
}

// writeResults prints the contenders' table.
func writeResults(out io.Writer, rep *report) {
	fmt.Fprintln(out)
	fmt.Fprintln(out, "| W | dist | contender | ok ops/s | errors | 53300 | exhausted | deadline | stuck | other | p50 ms | p99 ms | p99.9 ms | new server conns | conn reuse | server peak | tenantpg hit rate |")
	fmt.Fprintln(out, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range rep.results {
		if r.status != "" {
			fmt.Fprintf(out, "| %d | %s | %s | %s | | | | | | | | | | | | | |\n", r.workspaces, r.dist, r.contender, r.status)
			continue
		}
		m := r.m
		fmt.Fprintf(out, "| %d | %s | %s | %.0f | %d | %d | %d | %d | %d | %d | %.2f | %.2f | %.2f | %s | %s | %d/%d | %s |\n",
			r.workspaces, r.dist, r.contender, r.opsPerSec, m.errors(),
			m.errs[errTooMany], m.errs[errExhausted], m.errs[errDeadline], m.errs[errStuck], m.errs[errOther],
			ms(r.p50), ms(r.p99), ms(r.p999), countOrNA(r.serverConns), pct(r.reuse), r.peak, r.budget, pct(r.hitRate))
	}
}
