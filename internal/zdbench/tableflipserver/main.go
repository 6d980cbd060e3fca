// Command tableflipserver uses cloudflare/tableflip exactly as its
// documentation shows: Upgrade on SIGHUP, Ready, <-Exit(), then Shutdown
// with a timeout.
package main

import (
	"context"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/graceful-go/graceful/internal/zdbench"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "")
	pidfile := flag.String("pidfile", "", "")
	flag.Parse()
	upg, err := tableflip.New(tableflip.Options{PIDFile: *pidfile})
	if err != nil {
		log.Fatal(err)
	}
	defer upg.Stop()
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGHUP)
		for range sig {
			if err := upg.Upgrade(); err != nil {
				log.Println("upgrade failed:", err)
			}
		}
	}()
	ln, err := upg.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	stopping := make(chan struct{})
	srv := &http.Server{Handler: zdbench.Mux(stopping)}
	srv.RegisterOnShutdown(func() { close(stopping) })
	go srv.Serve(ln)
	if err := upg.Ready(); err != nil {
		log.Fatal(err)
	}
	<-upg.Exit()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
}
