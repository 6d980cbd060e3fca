// Package gracefulgrpc serves a [grpc.Server] with a [graceful.Process]:
// upgraded in place and drained without failing an RPC. It lives apart from
// package graceful so that only programs that import it build grpc-go.
//
// At the drain the listener stops accepting (new connections reach the
// successor), [grpc.Server.GracefulStop] sends GOAWAY to every client, which
// moves its new RPCs to a new connection, and waits for the RPCs in flight;
// at [graceful.Options.DrainTimeout] it falls back to [grpc.Server.Stop].
// Long-lived streaming handlers end themselves when
// [graceful.Process.Goodbye] fires, typically with codes.Unavailable, which
// clients retry.
package gracefulgrpc

import (
	"context"
	"net"

	"google.golang.org/grpc"

	"github.com/graceful-go/graceful"
)

// Serve registers srv to serve gRPC on ln when p runs, and to be drained
// with GracefulStop, then Stop at the drain deadline. Call it before
// [graceful.Process.Run] and do not start srv yourself.
func Serve(p *graceful.Process, srv *grpc.Server, ln net.Listener) {
	p.Add(func() error {
		return srv.Serve(ln)
	}, func(ctx context.Context) error {
		done := make(chan struct{})
		go func() {
			srv.GracefulStop()
			close(done)
		}()
		select {
		case <-done:
		case <-ctx.Done():
			srv.Stop() // cancels what is left; GracefulStop then returns
			<-done
		}
		return nil
	})
}
