package bench

import (
	"context"
	"io"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// BenchmarkStateHandOver measures the state hand-over (Process.OfferState):
// moving 100 MB from one process to another through a memfd (written,
// then read whole) against a pipe (written while the other side reads);
// and the reference server's upgrades with -state-size 100 MB against none:
// SIGHUP to the new process ready, and the peak RSS of the old and the new
// process.
//
//	go test -run '^$' -bench BenchmarkStateHandOver -benchtime 1x ./internal/bench
func BenchmarkStateHandOver(b *testing.B) {
	const size = 100 << 20
	blob := make([]byte, size)
	for i := range blob {
		blob[i] = byte(i)
	}
	b.Run("memfd", func(b *testing.B) {
		for range b.N {
			start := time.Now()
			fd, err := unix.MemfdCreate("bench", unix.MFD_CLOEXEC)
			if err != nil {
				b.Fatal(err)
			}
			f := os.NewFile(uintptr(fd), "bench")
			if _, err := f.Write(blob); err != nil {
				b.Fatal(err)
			}
			wrote := time.Since(start)
			// What the new process does (statefile_unix.go): map it.
			got, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
			if err != nil {
				b.Fatal(err)
			}
			available := time.Since(start)
			touch(got)
			b.ReportMetric(float64(wrote.Microseconds())/1000, "ms-writer-busy")
			b.ReportMetric(float64(available.Microseconds())/1000, "ms-to-available")
			b.ReportMetric(float64(time.Since(start).Microseconds())/1000, "ms-to-every-page-read")
			unix.Munmap(got)
			f.Close()
		}
	})
	b.Run("pipe", func(b *testing.B) {
		for range b.N {
			start := time.Now()
			r, w, err := os.Pipe()
			if err != nil {
				b.Fatal(err)
			}
			wrote := make(chan time.Duration, 1)
			go func() {
				w.Write(blob)
				w.Close()
				wrote <- time.Since(start)
			}()
			got := make([]byte, size)
			if _, err := io.ReadFull(r, got); err != nil {
				b.Fatal(err)
			}
			r.Close()
			available := time.Since(start)
			touch(got)
			b.ReportMetric(float64((<-wrote).Microseconds())/1000, "ms-writer-busy")
			b.ReportMetric(float64(available.Microseconds())/1000, "ms-to-available")
			b.ReportMetric(float64(time.Since(start).Microseconds())/1000, "ms-to-every-page-read")
		}
	})
	for _, n := range []int{0, size} {
		b.Run("upgrade-state-"+strconv.Itoa(n>>20)+"MB", func(b *testing.B) {
			for range b.N {
				srv := startReference(b, []string{"-state-size", strconv.Itoa(n)}, false)
				const upgrades = 3
				var ready time.Duration
				var oldPeak, newPeak int64
				for range upgrades {
					oldWatch := loadtest.WatchPeakRSS(srv.PID())
					u, err := srv.Upgrade(context.Background(), time.Minute)
					if err != nil {
						b.Fatal(err)
					}
					oldPeak = max(oldPeak, oldWatch())
					newPeak = max(newPeak, loadtest.ProcStatus(u.NewPID, "VmHWM"))
					ready += u.Ready
				}
				b.ReportMetric(float64(ready.Milliseconds())/upgrades, "ms-to-ready")
				b.ReportMetric(float64(oldPeak)/1024, "MiB-old-peak")
				b.ReportMetric(float64(newPeak)/1024, "MiB-new-peak")
			}
		})
	}
}

var touched byte

// touch reads a byte of every page of b.
func touch(b []byte) {
	var sum byte
	for i := 0; i < len(b); i += 4096 {
		sum += b[i]
	}
	touched = sum
}
