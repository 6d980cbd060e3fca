package main

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
	"time"
)

// The picture (-svg): one panel per server, time across. Each serving
// process's answered requests per second is a line of its own colour, so a
// hand-over shows as one line falling while the next rises; failed
// requests and cut streams per second are red bars; each deploy is a
// dashed line.
const (
	svgWidth      = 960
	svgPanel      = 200 // height of one panel's plot
	svgLeft       = 64
	svgRight      = 24
	svgTop        = 48 // above the first panel: the title
	svgGap        = 56 // between panels: the next panel's heading
	svgBucket     = 100 * time.Millisecond
	svgPerSecond  = float64(time.Second / svgBucket)
	svgFailColour = "#d62728"
)

// svgPalette colours the serving processes in the order they first
// answered.
var svgPalette = []string{"#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"}

// writeSVG draws results as one self-contained SVG document.
func writeSVG(w io.Writer, o options, results []*result) error {
	height := svgTop + len(results)*(svgPanel+svgGap) + 40
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", svgWidth, height, svgWidth, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="16" font-weight="bold">Requests per second by serving process: %d deploys per server, the same mixed load</text>`+"\n", svgLeft, o.upgrades)
	fmt.Fprintf(&b, `<text x="%d" y="38" fill="#555">one colour per process (PID) · red bars: failed requests and cut streams per second · dashed: a deploy</text>`+"\n", svgLeft)
	for i, r := range results {
		top := svgTop + svgGap + i*(svgPanel+svgGap) - 16
		panel(&b, r, top)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// panel draws one server's run with its plot's top edge at top.
func panel(b *strings.Builder, r *result, top int) {
	s := r.stats
	span := r.end.Sub(r.start)
	n := max(int(span/svgBucket), 1) // whole buckets: a partial last one would look like a drop
	perPID := map[string][]float64{}
	var order []string
	fails := make([]float64, n)
	for _, e := range s.Timeline {
		k := int(e.At.Sub(r.start) / svgBucket)
		if k < 0 || k >= n {
			continue
		}
		if e.Failed {
			fails[k] += svgPerSecond
			continue
		}
		if perPID[e.PID] == nil {
			perPID[e.PID] = make([]float64, n)
			order = append(order, e.PID)
		}
		perPID[e.PID][k] += svgPerSecond
	}
	peak := 1.0
	for _, series := range perPID {
		for _, v := range series {
			peak = math.Max(peak, v)
		}
	}
	for _, v := range fails {
		peak = math.Max(peak, v)
	}
	peak = niceCeil(peak)
	plotW := float64(svgWidth - svgLeft - svgRight)
	x := func(k float64) float64 { return svgLeft + plotW*k/float64(n) }
	y := func(v float64) float64 { return float64(top+svgPanel) - float64(svgPanel)*v/peak }

	failed := 0
	for _, c := range s.Failures {
		failed += c
	}
	failed += s.StreamFailures + s.StreamsAbrupt
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="14" font-weight="bold">%s</text>`, svgLeft, top-10, html.EscapeString(r.name))
	fmt.Fprintf(b, `<text x="%d" y="%d" fill="#555"> %d requests, %d failed or cut; %d processes</text>`+"\n", svgLeft+90, top-10, s.Requests, failed, len(order))
	// Axes and grid.
	fmt.Fprintf(b, `<rect x="%d" y="%d" width="%.0f" height="%d" fill="none" stroke="#999"/>`+"\n", svgLeft, top, plotW, svgPanel)
	for _, f := range []float64{0, 0.5, 1} {
		v := peak * f
		fmt.Fprintf(b, `<line x1="%d" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#eee"/>`, svgLeft, svgLeft+plotW, y(v), y(v))
		fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="end" fill="#555">%.0f/s</text>`+"\n", svgLeft-6, y(v)+4, v)
	}
	step := niceCeil(span.Seconds() / 10)
	for t := 0.0; t <= span.Seconds(); t += step {
		k := t * svgPerSecond
		fmt.Fprintf(b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%gs</text>`, x(k), top+svgPanel+14, t)
	}
	b.WriteString("\n")
	// Deploys.
	for _, u := range r.upgrades {
		k := float64(u.Sub(r.start)) / float64(svgBucket)
		fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#333" stroke-dasharray="4 3"/>`+"\n", x(k), x(k), top, top+svgPanel)
	}
	// Failures.
	for k, v := range fails {
		if v > 0 {
			fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`, x(float64(k)), y(v), math.Max(x(1)-x(0), 1.5), y(0)-y(v), svgFailColour)
		}
	}
	b.WriteString("\n")
	// One line per serving process, over the buckets where it answered.
	for i, pid := range order {
		series := perPID[pid]
		first, last := -1, -1
		for k, v := range series {
			if v > 0 {
				if first < 0 {
					first = k
				}
				last = k
			}
		}
		var pts []string
		for k := max(first-1, 0); k <= min(last+1, n-1); k++ {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(float64(k)+0.5), y(series[k])))
		}
		colour := svgPalette[i%len(svgPalette)]
		fmt.Fprintf(b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"><title>pid %s</title></polyline>`+"\n", colour, strings.Join(pts, " "), html.EscapeString(pid))
	}
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}
