package main

import (
	"fmt"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// writeOccupancyPNG plots, for each closed-loop tenantpg run, where the
// budget's tokens were over time and how many callers waited: one panel
// per run, stacked.
func writeOccupancyPNG(path string, rep *report) error {
	var panels [][]*plot.Plot
	for _, r := range rep.results {
		if len(r.occupancy) == 0 || r.contender != "tenantpg" {
			continue
		}
		p := plot.New()
		p.Title.Text = fmt.Sprintf("tenantpg budget over time, W=%d %s, budget %d", r.workspaces, distTitle(r.dist), r.budget)
		p.X.Label.Text = "seconds since the start (warm-up included)"
		p.Y.Label.Text = "tokens / callers"
		p.Legend.Top = true
		p.Add(plotter.NewGrid())
		series := []struct {
			name string
			get  func(occupancy) int
		}{
			{"in use", func(o occupancy) int { return o.inUse }},
			{"idle", func(o occupancy) int { return o.idle }},
			{"dialing", func(o occupancy) int { return o.dialing }},
			{"closing", func(o occupancy) int { return o.closing }},
			{"waiting callers", func(o occupancy) int { return o.waiting }},
		}
		for i, s := range series {
			xys := make(plotter.XYs, len(r.occupancy))
			for j, o := range r.occupancy {
				xys[j] = plotter.XY{X: o.at.Seconds(), Y: float64(s.get(o))}
			}
			l, err := plotter.NewLine(xys)
			if err != nil {
				return fmt.Errorf("occupancy png: %w", err)
			}
			l.Color = palette[i%len(palette)]
			l.Width = vg.Points(1)
			p.Add(l)
			p.Legend.Add(s.name, l)
		}
		p.Y.Min = 0
		panels = append(panels, []*plot.Plot{p})
	}
	if len(panels) == 0 {
		return fmt.Errorf("occupancy png: no tenantpg run to plot")
	}
	const width, rowHeight = 12 * vg.Inch, 4 * vg.Inch
	img := vgimg.New(width, rowHeight*vg.Length(len(panels)))
	tiles := draw.Tiles{Rows: len(panels), Cols: 1, PadX: vg.Inch / 3, PadY: vg.Inch / 3,
		PadTop: vg.Inch / 6, PadBottom: vg.Inch / 6, PadLeft: vg.Inch / 6, PadRight: vg.Inch / 6}
	canvases := plot.Align(panels, tiles, draw.New(img))
	for i := range panels {
		panels[i][0].Draw(canvases[i][0])
	}
	return savePNG(path, img)
}
