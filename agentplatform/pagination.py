from rest_framework.pagination import LimitOffsetPagination


class Pagination(LimitOffsetPagination):
    """`?limit=&offset=` on every list; responses carry count, next and previous."""

    default_limit = 50
    max_limit = 500
