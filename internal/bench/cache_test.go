package bench

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// BenchmarkCacheAfterUpgrade runs examples/cache (20 ms lookups) under 8
// keep-alive clients asking for 500 keys at random, warms it for 2 s, and
// reports the clients' p50 and p99 over the last second before an upgrade
// (steady state) and over the first second after the new process is
// ready, with the cache handed over and without (-no-state).
//
//	go test -run '^$' -bench BenchmarkCacheAfterUpgrade -benchtime 1x ./internal/bench
func BenchmarkCacheAfterUpgrade(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := b.TempDir()
	bin, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/cache", false)
	if err != nil {
		b.Fatal(err)
	}
	for _, mode := range []string{"handed-over", "no-state"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				var args []string
				if mode == "no-state" {
					args = []string{"-no-state"}
				}
				sdir := b.TempDir()
				logs, err := os.Create(filepath.Join(sdir, "server.log"))
				if err != nil {
					b.Fatal(err)
				}
				srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: sdir, Logs: logs, Args: args})
				if err != nil {
					b.Fatal(err)
				}
				type sample struct {
					at time.Time
					d  time.Duration
				}
				var mu sync.Mutex
				var samples []sample
				stop := make(chan struct{})
				var wg sync.WaitGroup
				for range 8 {
					wg.Go(func() {
						c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
						for {
							select {
							case <-stop:
								return
							default:
							}
							start := time.Now()
							resp, err := c.Get(fmt.Sprintf("http://%s/item?key=%d", srv.Addr, rand.IntN(500)))
							if err != nil {
								continue
							}
							io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
							mu.Lock()
							samples = append(samples, sample{start, time.Since(start)})
							mu.Unlock()
						}
					})
				}
				time.Sleep(3 * time.Second)
				before := time.Now()
				u, err := srv.Upgrade(ctx, time.Minute)
				if err != nil {
					b.Fatal(err)
				}
				ready := before.Add(u.Ready)
				time.Sleep(time.Until(ready.Add(time.Second)))
				close(stop)
				wg.Wait()
				srv.Follow()
				srv.Kill()
				logs.Close()
				quantiles := func(from, to time.Time) (p50, p99 time.Duration, n int) {
					var ds []time.Duration
					for _, s := range samples {
						if !s.at.Before(from) && s.at.Before(to) {
							ds = append(ds, s.d)
						}
					}
					if len(ds) == 0 {
						return 0, 0, 0
					}
					slices.Sort(ds)
					return ds[len(ds)/2], ds[len(ds)*99/100], len(ds)
				}
				s50, s99, sn := quantiles(before.Add(-time.Second), before)
				a50, a99, an := quantiles(ready, ready.Add(time.Second))
				b.Logf("%s: steady state p50 %v p99 %v (%d requests); first second after the upgrade p50 %v p99 %v (%d requests)", mode, s50, s99, sn, a50, a99, an)
				b.ReportMetric(float64(s50.Microseconds())/1000, "ms-steady-p50")
				b.ReportMetric(float64(s99.Microseconds())/1000, "ms-steady-p99")
				b.ReportMetric(float64(a50.Microseconds())/1000, "ms-after-p50")
				b.ReportMetric(float64(a99.Microseconds())/1000, "ms-after-p99")
				b.ReportMetric(float64(an), "requests-after")
			}
		})
	}
}
